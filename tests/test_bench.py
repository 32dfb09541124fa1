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


# ---- bench/bench_topk_mask.py --------------------------------------------------------------------

TOPK_SCRIPT = REPO / "bench" / "bench_topk_mask.py"
TOPK_METHODS = {"kthvalue", "topk", "sort", "ours_cpu"}


@pytest.fixture
def topk_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(TOPK_SCRIPT.parent))
    import bench_topk_mask
    return bench_topk_mask


def test_topk_cpu_quick_run_writes_rows_and_table(tmp_path, topk_bench):
    run = subprocess.run([sys.executable, str(TOPK_SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (path,) = tmp_path.glob("topk_mask_cpu-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    cases = {(s, d) for s in (10**4, 10**5) for d in ("float32", "bfloat16")}
    assert {(r["method"], r["size"], r["dtype"]) for r in rows} == {(m, *c) for m in TOPK_METHODS for c in cases}
    assert len(rows) == len(TOPK_METHODS) * len(cases)

    by = {(r["method"], r["size"], r["dtype"]): r for r in rows}
    for r in rows:
        for key in ("date", "device", "torch", "triton", "git_sha"):
            assert r[key], key
        assert r["quick"] is True and r["status"] == "ok" and r["sparsity"] == 0.5
        assert 95 <= r["tensors"] <= 100 and r["size"] - r["d"] <= r["n"] <= r["size"]
        assert r["k"] == round(r["n"] / 2)
        assert r["score_bytes"] == r["n"] * {"float32": 4, "bfloat16": 2}[r["dtype"]]
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        assert r["gbps"] == pytest.approx(r["score_bytes"] / r["ms"] / 1e6)
        assert r["reads"] == pytest.approx(r["ms"] * r["copy_gbps"] * 1e6 / r["score_bytes"])
        base = {b: by[b, r["size"], r["dtype"]]["ms"] for b in ("kthvalue", "topk", "sort")}
        for b, ms in base.items():
            assert r[f"speedup_vs_{b}"] == pytest.approx(ms / r["ms"])
        assert r["best_baseline"] == min(base, key=base.get)
        assert isinstance(r["peak_bytes"], int) and r["peak_method"] == "VmHWM - VmRSS"
    for r in rows:
        # one bool a score for the baselines; ours packed, each tensor viewed as (shape[0], rest) or (1, n)
        views = [(s[0], math.prod(s[1:])) if len(s) > 1 else (1, s[0]) for s in topk_bench.layer_shapes(r["size"])]
        packed = sum(4 * rows * math.ceil(cols / 32) for rows, cols in views)
        assert r["mask_bytes"] == (packed if r["method"] == "ours_cpu" else r["n"])

    (md_path,) = tmp_path.glob("topk_mask_cpu-*.md")
    md = md_path.read_text()
    assert rows[0]["device"] in md and rows[0]["git_sha"] in md and rows[0]["torch"] in md
    assert len([line for line in md.splitlines() if line.startswith("| 1e")]) == len(rows)
    targets = [line for line in md.split("## Targets")[1].splitlines() if line.startswith("- ")]
    # quick sizes miss the 1e7 speed target; one memory line per dtype
    assert targets[0].startswith("- n/a") and "1e+07" in targets[0], targets
    assert sum("temporaries beyond the masks" in t for t in targets) == 2, targets


def test_topk_workload_shapes_and_tie_free_scores(topk_bench):
    for n in (10**4, 10**6, 10**9):
        shapes = topk_bench.layer_shapes(n)
        total = sum(math.prod(s) for s in shapes)
        assert len(shapes) == 98 and n - shapes[0][0] <= total <= n
    shapes = topk_bench.layer_shapes(20_000)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scores = topk_bench.tie_free_scores(shapes, dtype, torch.device("cpu"), seed=3)
        assert [tuple(s.shape) for s in scores] == shapes and all(s.dtype == dtype for s in scores)
        flat = torch.cat([s.reshape(-1) for s in scores]).float()
        assert torch.isfinite(flat).all() and (flat < 0).any() and (flat > 0).any()
        assert flat.unique().numel() == flat.numel()  # distinct values, and -0.0 never beside +0.0


def _tied_scores():
    # bf16 values in {1, 2, 3}: the k-th largest is tied across several tensors
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 40), (7,), (5, 2, 9), (64,)]
    return [torch.randint(1, 4, s, generator=gen).to(torch.bfloat16) for s in shapes]


def test_topk_guards_pass_the_cpu_kernel(topk_bench):
    cpu = torch.device("cpu")
    found = topk_bench.methods(cpu)
    assert topk_bench.check_tie_free(found, topk_bench.layer_shapes(20_000), torch.bfloat16, 0.7, cpu, seed=1) == {}
    topk_bench.check_rule(found, _tied_scores(), 100)


def test_topk_guards_stop_a_wrong_count(topk_bench):
    cpu = torch.device("cpu")
    found = {**topk_bench.methods(cpu), "ours_cpu": lambda scores, k: topk_bench.topk_mask(scores, k - 1)}
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED \(tie-free.*bits set, expected k"):
        topk_bench.check_tie_free(found, topk_bench.layer_shapes(20_000), torch.float32, 0.5, cpu, seed=1)


def test_topk_rule_guard_stops_wrong_tie_order(topk_bench):
    # Selecting over the tensors in reverse order is right without ties and wrong with them: only the
    # rule guard on the (tied) timed scores can see it.
    cpu = torch.device("cpu")
    reverse = lambda scores, k: topk_bench.topk_mask(scores[::-1], k)[::-1]
    found = {**topk_bench.methods(cpu), "ours_cpu": reverse}
    topk_bench.check_tie_free(found, topk_bench.layer_shapes(20_000), torch.bfloat16, 0.5, cpu, seed=1)
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED \(rule.*masks differ"):
        topk_bench.check_rule(found, _tied_scores(), 100)
