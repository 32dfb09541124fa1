"""Smoke test of bench/bench_dst.py (the RigL update benchmark): the CPU quick run finishes and writes
what it says, and its guard stops an update that differs from the plain-torch one."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_engine.pruning.methods import drop_grow

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_dst.py"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    return importlib.import_module("bench_dst")


def test_quick_run_writes_rows_and_table(tmp_path, bench):
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (path,) = tmp_path.glob("dst_cpu-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    models = {"mlp-64-48-32-10", "mlp-64-256-256-10"}
    assert {(r["model"], r["method"]) for r in rows} == {(m, k) for m in models for k in bench.LABELS}
    by = {(r["model"], r["method"]): r for r in rows}
    for r in rows:
        assert r["ms"] > 0 and r["git_sha"] and r["quick"] is True
        assert r["train_steps"] == pytest.approx(r["ms"] / by[r["model"], "train_step"]["ms"])
        ref = bench.REFERENCE.get(r["method"])
        assert r["speedup_vs_plain_torch"] == (pytest.approx(by[r["model"], ref]["ms"] / r["ms"]) if ref else None)
    (md,) = tmp_path.glob("dst_cpu-*.md")
    text = md.read_text()
    assert text.count("\n| mlp-") == len(rows) and "## Summary" in text


def test_guard_stops_a_wrong_update(bench, monkeypatch):
    import torch

    case = bench.Case(bench.workloads(True, torch.device("cpu"))[0], torch.device("cpu"), 0)
    bench.check(case)  # passes as it is
    wrong = lambda masks, drop, grow, n_drop: [m.clone() for m in masks]  # noqa: E731 - grows nothing
    monkeypatch.setattr(drop_grow, "drop_and_grow_masks_ref", wrong)
    with pytest.raises(SystemExit) as exit_info:
        bench.check(case)
    assert exit_info.value.code == 1
