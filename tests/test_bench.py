"""Smoke test of bench/bench_masked_linear.py: the CPU quick run finishes and writes what it says,
and its correctness guard stops a wrong kernel. Speed is the benchmark's business, not this test's."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "bench_masked_linear.py"
METHODS = {"dense", "wm", "prune", "ours_cpu"}
PASSES = {"fwd", "bwd", "fwd+bwd"}
QUICK_SHAPES = {(128, 96, 160), (16, 100, 72), (1, 96, 160)}


def run_quick(out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(out_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def read_rows(out_dir: Path) -> list[dict]:
    (path,) = out_dir.glob("masked_linear_cpu-*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import bench_masked_linear
    return bench_masked_linear


def test_cpu_quick_run_writes_rows_and_table(tmp_path, bench):
    first = run_quick(tmp_path)
    assert first.returncode == 0, first.stderr
    rows = read_rows(tmp_path)
    assert len(rows) == len(METHODS) * len(PASSES) * len(QUICK_SHAPES)
    assert {(r["method"], r["pass"], (r["M"], r["K"], r["N"])) for r in rows} == {
        (m, p, s) for m in METHODS for p in PASSES for s in QUICK_SHAPES}

    by = {(r["method"], r["pass"], r["M"], r["K"], r["N"]): r for r in rows}
    for r in rows:
        for key in ("date", "device", "torch", "triton", "git_sha"):
            assert r[key], key
        assert r["dtype"] == "float32" and r["quick"] is True and r["timer"] == "perf_counter"
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["tflops"] == pytest.approx(
            {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[r["pass"]] * r["M"] * r["N"] * r["K"] / r["ms"] / 1e9)
        assert r["pct_of_ceiling_tflops"] == pytest.approx(100 * r["tflops"] / r["ceiling_tflops"])
        for base in ("dense", "wm", "prune"):
            assert r[f"speedup_vs_{base}"] == pytest.approx(by[base, r["pass"], r["M"], r["K"], r["N"]]["ms"] / r["ms"])
        assert r["peak_mib_fwd_bwd"] is None  # not measured on CPU
    for r in (r for r in rows if r["method"] == "ours_cpu"):
        assert all(e < 1e-4 for e in r["rel_err"].values()), r["rel_err"]
        assert r["mask_bits_bytes"] == 4 * r["N"] * math.ceil(r["K"] / 32)

    (md_path,) = tmp_path.glob("masked_linear_cpu-*.md")
    md = md_path.read_text()
    assert rows[0]["device"] in md and rows[0]["git_sha"] in md and rows[0]["torch"] in md
    table_lines = [line for line in md.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert len(table_lines) == len(rows) + 1  # + header
    targets = [line for line in md.split("## Targets")[1].splitlines() if line.startswith("- ")]
    # training 128x96x160: two fwd+bwd lines; decode 16x100x72 and 1x96x160: one fwd line each;
    # one mask line per weight shape
    assert len(targets) == 6, targets
    assert any(t.startswith("- met") and "1/16.00" in t and "weight 160x96" in t for t in targets), targets
    assert any(t.startswith("- NOT met") and "1/12.50" in t and "weight 72x100" in t for t in targets), targets

    # A second run (in this process: it skips the interpreter's start-up) appends to the JSON
    # lines and rewrites the table.
    bench.main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)])
    assert len(read_rows(tmp_path)) == 2 * len(rows)
    assert md_path.read_text().count("\n| ") == md.count("\n| ")


def _input_set(bench):
    gen = torch.Generator().manual_seed(0)
    return bench.make_input_set(33, 100, 47, torch.float32, 0.5, torch.device("cpu"), gen)


def test_guard_passes_the_cpu_kernel(bench):
    s = _input_set(bench)
    errors = bench.check_against_reference("ours_cpu", bench.methods(torch.device("cpu"))["ours_cpu"], s)
    assert max(errors.values()) < 1e-4


def test_guard_stops_a_kernel_that_ignores_the_mask(bench):
    s = _input_set(bench)
    with pytest.raises(SystemExit, match="CORRECTNESS GUARD FAILED.*y relative error"):
        bench.check_against_reference("ours_cpu", lambda s: F.linear(s.x, s.weight), s)


def test_guard_stops_gradient_reaching_pruned_weights(bench):
    # The forward value is exact; only the weight gradient leaks (by 1e-30 x dY^T X) into pruned entries.
    s = _input_set(bench)
    leaky = lambda s: F.linear(s.x, s.weight * s.keep + (s.weight - s.weight.detach()) * 1e-30)
    with pytest.raises(SystemExit, match="pruned weights have a nonzero gradient"):
        bench.check_against_reference("ours_cpu", leaky, s)
