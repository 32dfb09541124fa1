"""Smoke test of bench/bench_masked_linear.py: the CPU quick run finishes and writes what it says,
and its correctness guard stops a wrong kernel. Speed is the benchmark's business, not this test's."""
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sparse_engine import sparse_modules

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


# ---- bench/bench_pruning_step.py -----------------------------------------------------------------

STEP_SCRIPT = REPO / "bench" / "bench_pruning_step.py"
STEP_QUICK_MODELS = {"mlp-64-48-32-10": 64 * 48 + 48 * 32 + 32 * 10, "mlp-64-256-256-10": 64 * 256 + 256 * 256 + 2560,
                     "cnn-16x16-8-16": 3 * 8 * 9 + 8 * 8 * 9 + 8 * 16 * 9 + 16 * 16 * 9 + 16 * 4 * 4 * 256 + 2560}


def import_bench(monkeypatch, script: Path):
    monkeypatch.syspath_prepend(str(script.parent))
    return importlib.import_module(script.stem)


def quick_cpu_rows(script: Path, out_dir: Path, prefix: str) -> list[dict]:
    """Runs ``script --device cpu --quick`` into ``out_dir``; the JSON lines it wrote."""
    cmd = [sys.executable, str(script), "--device", "cpu", "--quick", "--out-dir", str(out_dir)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (path,) = out_dir.glob(f"{prefix}_cpu-*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def step_bench(monkeypatch):
    return import_bench(monkeypatch, STEP_SCRIPT)


def test_pruning_step_cpu_quick_run_writes_rows_and_table(tmp_path, step_bench):
    rows = quick_cpu_rows(STEP_SCRIPT, tmp_path, "pruning_step")
    methods, optimizers = set(step_bench.LABELS), {"adamw", "sgd"}
    assert {(r["model"], r["optimizer"], r["method"]) for r in rows} == {
        (m, o, x) for m in STEP_QUICK_MODELS for o in optimizers for x in methods}
    assert len(rows) == len(STEP_QUICK_MODELS) * len(optimizers) * len(methods)

    by = {(r["model"], r["optimizer"], r["method"]): r for r in rows}
    for r in rows:
        for key in ("date", "device", "torch", "triton", "git_sha", "copy_gbps", "load_avg_1min_end"):
            assert r[key] is not None, key
        assert r["quick"] is True and r["dtype"] == "float32" and r["timer"] == "perf_counter"
        assert r["weights"] == STEP_QUICK_MODELS[r["model"]]
        assert (r["sparsity_from"], r["sparsity_to"]) == (0.5, 0.6)
        assert r["pruned_by_step"] == round(0.6 * r["weights"]) - round(0.5 * r["weights"])
        assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        same = by[r["model"], r["optimizer"], step_bench.TRAIN_OF[r["method"]]]
        assert r["train_steps"] == pytest.approx(r["ms"] / same["ms"])
        assert r["dense_train_steps"] == pytest.approx(r["ms"] / by[r["model"], r["optimizer"], "dense_train"]["ms"])
        ref = step_bench.TORCH_EQUIVALENT.get(r["method"])
        assert r["speedup_vs_torch"] == (None if ref is None else
                                         pytest.approx(by[r["model"], r["optimizer"], ref]["ms"] / r["ms"]))
        if r["method"] in ("ours_step", "torch_step"):
            states = {"adamw": 2, "sgd": 1}[r["optimizer"]]
            n = r["weights"]
            assert r["floor_bytes"] == 4 * n + math.ceil(n / 8) + 2 * states * 4 * n
            assert r["gbps"] == pytest.approx(r["floor_bytes"] / r["ms"] / 1e6)
            assert r["x_floor"] == pytest.approx(r["ms"] * r["copy_gbps"] * 1e6 / r["floor_bytes"])
        else:
            assert r["floor_bytes"] is None and r["gbps"] is None and r["x_floor"] is None

    (md_path,) = tmp_path.glob("pruning_step_cpu-*.md")
    md = md_path.read_text()
    assert rows[0]["device"] in md and rows[0]["git_sha"] in md and rows[0]["torch"] in md
    assert len([line for line in md.splitlines() if line.startswith("| mlp-") or line.startswith("| cnn-")]) == len(rows)
    summary = [line for line in md.split("## Summary")[1].splitlines() if line.startswith("- ")]
    assert len(summary) == 3 * len(STEP_QUICK_MODELS) * len(optimizers), summary  # headline, restore_on_error, phases


def test_pruning_step_tie_free_weights(step_bench):
    model = step_bench.cnn(8, 16, 16)
    step_bench.set_tie_free_weights_(model, seed=1)
    w = torch.cat([m.weight.reshape(-1) for m, _ in step_bench.prunable(model)])
    assert w.abs().unique().numel() == w.numel() and (w > 0).any() and (w < 0).any()


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
@pytest.mark.parametrize("family,s_from", [("mlp", 0.5), ("cnn", 0.0), ("mlp-stack", 0.3)])
def test_pruning_step_guard_passes(step_bench, family, s_from, opt):
    w = step_bench.workloads(True, 2)[family]
    step_bench.check_step(w, opt, s_from, 0.6, torch.device("cpu"), seed=2)


def test_pruning_step_guard_stops_a_wrong_torch_count(step_bench, monkeypatch):
    original = step_bench.torch_prune
    monkeypatch.setattr(step_bench, "torch_prune", lambda params, amount: original(params, amount - 1))
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED .*mask entries differ"):
        step_bench.check_step(step_bench.workloads(True, 2)["mlp"], "sgd", 0.5, 0.6, torch.device("cpu"), seed=0)


def test_pruning_step_guard_stops_state_left_uncleared(step_bench, monkeypatch):
    monkeypatch.setattr(step_bench, "ours_step", lambda model, handle, s: step_bench.prune_(model, s))
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED .*ours: layer \d state 'exp_avg' nonzero"):
        step_bench.check_step(step_bench.workloads(True, 2)["mlp"], "adamw", 0.5, 0.6, torch.device("cpu"), seed=0)


def test_cpu_median_ms_runs_before_untimed(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import time

    from timing import cpu_median_ms
    calls = []
    t = cpu_median_ms(lambda i: calls.append(("step", i)), 2, warmup=1, min_reps=4, min_time_s=0.0,
                      before=lambda i: (calls.append(("before", i)), time.sleep(0.02)), sync=lambda: None)
    assert t.median < 10  # ms: the 20 ms sleeps of before() are not timed
    assert calls == [(kind, i % 2) for i in (0, 0, 1, 2, 3) for kind in ("before", "step")]  # warm-up, then 4


# ---- bench/bench_block_solve.py ------------------------------------------------------------------

SOLVE_SCRIPT = REPO / "bench" / "bench_block_solve.py"


@pytest.fixture
def solve_bench(monkeypatch):
    return import_bench(monkeypatch, SOLVE_SCRIPT)


@pytest.fixture(scope="module")
def solve_quick_run(tmp_path_factory) -> tuple[list[dict], str]:
    """One CPU quick run of every section, shared by the tests that read it: (rows, markdown)."""
    out_dir = tmp_path_factory.mktemp("block_solve")
    rows = quick_cpu_rows(SOLVE_SCRIPT, out_dir, "block_solve")
    (md_path,) = out_dir.glob("block_solve_cpu-*.md")
    return rows, md_path.read_text()


def test_block_solve_cpu_quick_run_writes_rows_and_table(solve_quick_run, solve_bench):
    all_rows, md = solve_quick_run
    assert {r["section"] for r in all_rows} == set(solve_bench.SECTIONS)
    rows = [r for r in all_rows if r["section"] == "cholesky"]
    sizes, rhs = solve_bench.CHOLESKY_SIZES["quick"], solve_bench.DEFAULT_RHS
    ops = [("factor", None)] + [("solve", r) for r in rhs]
    assert sorted((r["batch"], r["n"], r["op"], r["rhs"] or 0, r["method"]) for r in rows) == sorted(
        (b, n, op, r or 0, m) for b, n in sizes for op, r in ops for m in ("torch", "ours"))

    by = {(r["batch"], r["n"], r["op"], r["rhs"], r["method"]): r for r in rows}
    for r in rows:
        for key in ("date", "device", "torch", "triton", "git_sha", "copy_gbps"):
            assert r[key] is not None, key
        assert r["section"] == "cholesky" and r["quick"] is True and r["dtype"] == "float32"
        assert r["timer"] == "perf_counter" and r["label"] in ("torch.linalg", "block_cholesky[cpu]")
        assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        b, n = r["batch"], r["n"]
        flops = b * (n ** 3 / 3 if r["op"] == "factor" else 2 * n * n * r["rhs"])
        assert r["gflops"] == pytest.approx(flops / r["ms"] / 1e6)
        nbytes = 4 * b * (2 * n * n if r["op"] == "factor" else n * n + 2 * n * r["rhs"])
        assert r["gbps"] == pytest.approx(nbytes / r["ms"] / 1e6)
        torch_ms = by[b, n, r["op"], r["rhs"], "torch"]["ms"]
        assert r["speedup_vs_torch"] == pytest.approx(torch_ms / r["ms"])
        assert 0 <= r["rel_err_vs_fp64"] < solve_bench.TOLERANCE  # both methods, fp32 on condition < 5

    assert rows[0]["device"] in md and rows[0]["git_sha"] in md and rows[0]["torch"] in md
    assert len([line for line in md.splitlines() if line.startswith(tuple(f"| {b} x {n}^2" for b, n in sizes))]) \
        == len(rows)
    targets = [line for line in md.split("## Targets")[1].splitlines() if line.startswith("- cholesky: ")]
    assert len(targets) == len(rows) // 2 and all("no slower than torch" in t for t in targets), targets


def test_block_solve_guard_stops_a_wrong_factor_or_solve(solve_bench, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    a = solve_bench.spd_blocks(4, 40, torch.device("cpu"), gen)
    L = torch.linalg.cholesky(a)
    bs = {3: torch.randn(4, 40, 3, generator=gen)}
    factors = {"torch": L, "ours": L.contiguous()}
    errors = solve_bench.check_cholesky(solve_bench.cholesky_methods(), a, factors, bs)
    assert set(errors) == {("factor", 0, "torch"), ("factor", 0, "ours"), ("solve", 3, "torch"), ("solve", 3, "ours")}
    assert max(errors.values()) < 1e-5

    good = solve_bench.cholesky_methods()
    wrong_factor = {**good, "factor": {**good["factor"], "ours": lambda a: solve_bench.block_cholesky(a) * (1 + 1e-3)}}
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED \(cholesky.*factor r=0 ours: relative error"):
        solve_bench.check_cholesky(wrong_factor, a, factors, bs)
    # one wrong element of one block's solution
    def wrong(L, b):
        x = solve_bench.block_cholesky_solve(L, b)
        x[2, 17, 1] += 1e-2 * x[2].norm()
        return x
    wrong_solve = {**good, "solve": {**good["solve"], "ours": wrong}}
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED .*solve r=3 ours: relative error"):
        solve_bench.check_cholesky(wrong_solve, a, factors, bs)


def test_block_solve_obs_and_chita_quick_rows(solve_quick_run, solve_bench):
    all_rows, md = solve_quick_run
    obs = {r["method"]: r for r in all_rows if r["section"] == "obs"}
    chita = {r["method"]: r for r in all_rows if r["section"] == "chita"}
    assert set(obs) == {"torch_loop", "ours"} and set(chita) == {"torch_ref", "ours"}  # ours_cpu: CUDA runs only
    rows_, cols = solve_bench.OBS_SHAPES["quick"]
    n, p = solve_bench.CHITA_SHAPES["quick"]
    for r in [*obs.values(), *chita.values()]:
        for key in ("date", "device", "torch", "git_sha", "copy_gbps"):
            assert r[key] is not None, key
        assert r["quick"] is True and r["dtype"] == "float32" and r["timer"] == "perf_counter"
        assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
    base = obs["torch_loop"]
    for r in obs.values():
        assert (r["rows"], r["cols"], r["block"], r["sparsity"]) == (rows_, cols, solve_bench.OBS_BLOCK,
                                                                     solve_bench.OBS_SPARSITY)
        assert r["speedup_vs_torch"] == pytest.approx(base["ms"] / r["ms"])
        assert r["rel_err_vs_loop"] == pytest.approx(abs(r["recon_err"] - base["recon_err"]) / base["recon_err"])
        assert r["rel_err_vs_loop"] <= solve_bench.OBS_ERROR_RTOL
        assert 0 < r["err_vs_magnitude"] < 1  # OBS beats magnitude on correlated inputs
    ref = chita["torch_ref"]
    for r in chita.values():
        assert (r["n"], r["p"], r["k"], r["solve_device"]) == (n, p, p - round(solve_bench.CHITA_SPARSITY * p), "cpu")
        assert r["speedup_vs_torch"] == pytest.approx(ref["ms"] / r["ms"])
        assert r["rel_obj_vs_ref"] == pytest.approx((r["objective"] - ref["objective"]) / ref["objective"])
        assert r["rel_obj_vs_ref"] <= solve_bench.CHITA_OBJ_RTOL and 0 < r["obj_vs_magnitude"] <= 1
    assert len([line for line in md.splitlines() if line.startswith(f"| {rows_} x {cols} |")]) == 2
    assert len([line for line in md.splitlines() if line.startswith(f"| {n} x {p} |")]) == 2
    targets = md.split("## Targets")[1].splitlines()
    assert len([t for t in targets if t.startswith("- obs: ") and "no slower" in t]) == 1
    assert len([t for t in targets if t.startswith("- chita: ") and "no slower" in t]) == 1


def test_block_solve_obs_guard(solve_bench):
    gen = torch.Generator().manual_seed(3)
    problem = solve_bench.obs_problem(24, 70, torch.device("cpu"), gen)
    good = solve_bench.obs_methods(0.6, 32, 0.01)
    errors = solve_bench.check_obs(good, problem, 0.6)
    assert errors["ours"]["rel_err_vs_loop"] < 1e-5 and errors["ours"]["err"] < errors["magnitude"]["err"]

    def magnitude(p):  # the right count, but no OBS update: a larger error
        keep = torch.zeros(p.W.numel(), dtype=torch.bool)
        keep[p.W.abs().flatten().topk(p.W.numel() - round(0.6 * p.W.numel())).indices] = True
        keep = keep.view_as(p.W)
        return p.W * keep, keep
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED \(obs.*ours: reconstruction error"):
        solve_bench.check_obs({**good, "ours": magnitude}, problem, 0.6)

    def one_short(p):
        W, keep = good["ours"](p)
        keep = keep.contiguous()  # ours returns a transposed view
        keep.view(-1)[int((~keep).flatten().nonzero()[0])] = True
        return W, keep
    with pytest.raises(SystemExit, match=r"ours: \d+ weights pruned, expected \d+"):
        solve_bench.check_obs({**good, "ours": one_short}, problem, 0.6)


def test_block_solve_chita_guard(solve_bench):
    gen = torch.Generator().manual_seed(4)
    problem = solve_bench.chita_problem(40, 300, 0.8, torch.device("cpu"), gen)
    good = solve_bench.chita_methods()
    objs = solve_bench.check_chita(good, problem)
    assert objs["ours"]["obj"] <= objs["torch_ref"]["obj"] * (1 + 1e-6) < objs["magnitude"]["obj"]

    def backsolve_only(q):  # magnitude's support, backsolved: valid, but worse than IHT here
        return solve_bench.chita_solve(q.X, q.w0, q.k, q.l2, iters=0)
    assert solve_bench.chita_objective(problem.X.double(), backsolve_only(problem)[0].double(),
                                       problem.w0.double(), problem.l2) > objs["ours"]["obj"] * (1 + 1e-3)
    with pytest.raises(SystemExit, match=r"CORRECTNESS GUARD FAILED \(chita.*ours: objective .* above the plain"):
        solve_bench.check_chita({**good, "ours": backsolve_only}, problem)

    def one_more(q):
        w, keep = good["ours"](q)
        keep[int((~keep).nonzero()[0])] = True
        return w, keep
    with pytest.raises(SystemExit, match=r"ours: \d+ weights kept, expected \d+"):
        solve_bench.check_chita({**good, "ours": one_more}, problem)


def test_block_solve_gpu_targets_read_speedups_and_errors(solve_bench):
    cuda = torch.device("cuda")
    obs = [dict(method="torch_loop", ms=30.0, ms_p20=29.0, ms_p80=31.0, rows=4096, cols=4096, rel_err_vs_loop=0.0,
                speedup_vs_torch=1.0),
           dict(method="ours", ms=8.0, ms_p20=8.0, ms_p80=8.0, rows=4096, cols=4096, rel_err_vs_loop=2e-7,
                speedup_vs_torch=3.75)]
    assert solve_bench.obs_targets(obs, cuda)[0].startswith("met ")
    obs[1]["rel_err_vs_loop"] = 2e-3  # fast, but a different error: not met
    assert solve_bench.obs_targets(obs, cuda)[0].startswith("NOT met")
    chita = [dict(method="torch_ref", ms=900.0, ms_p20=900.0, ms_p80=900.0, n=1000, p=1 << 20, objective=5.0,
                  rel_obj_vs_ref=0.0),
             dict(method="ours", ms=40.0, ms_p20=40.0, ms_p80=40.0, n=1000, p=1 << 20, objective=5.0,
                  rel_obj_vs_ref=0.0),
             dict(method="ours_cpu", ms=1000.0, ms_p20=1000.0, ms_p80=1000.0, n=1000, p=1 << 20, objective=5.001,
                  rel_obj_vs_ref=2e-4)]
    line = solve_bench.chita_targets(chita, cuda)[0]
    assert line.startswith("met ") and "= 25 " in line
    chita[2]["objective"] = 5.1  # GPU and CPU disagree on the objective: not met
    assert solve_bench.chita_targets(chita, cuda)[0].startswith("NOT met")


# ---- bench/bench_sweep.py ------------------------------------------------------------------------

def test_sweep_bench_smoke_run_writes_overhead_and_throughput(tmp_path):
    """The sweep runner's benchmark runs end to end (tiny trials): both overhead rows and 1/2/4 workers."""
    cmd = [sys.executable, str(REPO / "bench" / "bench_sweep.py"), "--quick", "--train-size", "256", "--threads", "1",
           "--out-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (path,) = tmp_path.glob("sweep_cpu-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    overhead = {r["method"]: r for r in rows if r["section"] == "overhead"}
    assert set(overhead) == {"bare", "runner"} and overhead["runner"]["trials"] == 3
    assert all(r["seconds"] > 0 for r in rows)
    assert overhead["runner"]["overhead_s_per_trial"] == pytest.approx(
        (overhead["runner"]["seconds"] - overhead["bare"]["seconds"]) / 3)
    assert sorted(r["workers"] for r in rows if r["section"] != "overhead") == [1, 2, 4]
    assert "| runner | 3 |" in next(tmp_path.glob("sweep_cpu-*.md")).read_text()

# ---- bench/bench_stack.py ------------------------------------------------------------------------

STACK_SCRIPT = REPO / "bench" / "bench_stack.py"


@pytest.fixture
def stack_bench(monkeypatch):
    return import_bench(monkeypatch, STACK_SCRIPT)


def test_stack_cpu_quick_run_writes_rows_and_table(tmp_path, stack_bench):
    cmd = [sys.executable, str(STACK_SCRIPT), "--device", "cpu", "--quick", "--out-dir", str(tmp_path)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    (path,) = tmp_path.glob("stack_cpu-*.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    methods = ("sequential", "stacked", "dense sequential", "dense vmap")
    assert {(r["model"], r["k"], r["method"]) for r in rows} == {
        (m, k, x) for m in stack_bench.MODELS for k in stack_bench.QUICK_KS for x in methods}
    by = {(r["model"], r["k"], r["method"]): r for r in rows}
    for r in rows:
        baseline = "dense sequential" if r["method"].startswith("dense") else "sequential"
        for key in ("date", "device", "torch", "git_sha", "load_avg_1min"):
            assert r[key] is not None, key
        assert r["quick"] is True and r["batch"] == 16 and r["timer"] == "perf_counter"
        assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["model_steps_per_s"] == pytest.approx(r["k"] / r["ms"] * 1e3)
        assert r["speedup"] == pytest.approx(by[r["model"], r["k"], baseline]["ms"] / r["ms"])
        assert r["peak_bytes"] >= 0
    table = next(tmp_path.glob("stack_cpu-*.md")).read_text()
    assert "| mlp | 4 |" in table and "| cnn | 1 |" in table and "dense vmap speedup (the bound)" in table


def test_stack_guard_stops_a_stacked_step_that_differs(stack_bench, monkeypatch):
    stack_bench.guard(torch.device("cpu"))  # passes as is
    broken = lambda self, i: self.stacked(self.batches[i % 2][0]).sum().backward()  # no optimizer step
    monkeypatch.setattr(stack_bench.Case, "stacked_step", broken)
    with pytest.raises(SystemExit, match="CORRECTNESS GUARD FAILED: model 0"):
        stack_bench.guard(torch.device("cpu"))

# ---- bench/bench_models.py -----------------------------------------------------------------------

MODELS_SCRIPT = REPO / "bench" / "bench_models.py"


@pytest.fixture
def models_bench(monkeypatch):
    return import_bench(monkeypatch, MODELS_SCRIPT)


def test_models_cpu_quick_run_writes_rows_and_table(tmp_path, models_bench):
    rows = quick_cpu_rows(MODELS_SCRIPT, tmp_path, "models")
    names = [w.name for w in models_bench.workloads(True)]
    assert len(names) == 6 and "lstm" in names
    optimizers = list(models_bench.OPTIMIZERS)
    assert optimizers == ["adamw", "adamw-fused"]
    assert sorted((r["model"], r["optimizer"], r["method"]) for r in rows) == sorted(
        (n, o, m) for n in names for o in optimizers for m in ("dense", "ours", "prune"))
    by = {(r["model"], r["optimizer"], r["method"]): r for r in rows}
    for r in rows:
        assert r["ms"] > 0 and r["git_sha"] and r["quick"] is True and r["threads"] == 1
        assert r["over_dense"] == pytest.approx(r["ms"] / by[r["model"], r["optimizer"], "dense"]["ms"])
        assert r["over_prune"] == pytest.approx(r["ms"] / by[r["model"], r["optimizer"], "prune"]["ms"])
        if r["method"] == "ours":  # every model has a masked linear or conv layer: choices were made
            assert set(r["dispatch"]) == {"fused", "materialized"} and sum(r["dispatch"].values()) > 0
        else:
            assert r["dispatch"] is None
    (md,) = tmp_path.glob("models_cpu-*.md")
    text = md.read_text()
    assert sum(line.startswith(f"| {n} |") for n in names for line in text.splitlines()) == 2 * len(names)
    assert "| adamw-fused |" in text
    assert "Goal not met:" in text


def test_models_guard_stops_different_masks(models_bench):
    w = models_bench.workloads(True)[0]
    case = models_bench.Case(w, torch.device("cpu"), 0, "adamw")
    models_bench.check_before(case, w.name)  # passes as it is
    _, unit = sparse_modules(case.models["ours"])[0]
    unit.set_mask(torch.ones_like(unit.mask))
    with pytest.raises(SystemExit) as exit_info:
        models_bench.check_before(case, w.name)
    assert exit_info.value.code == 1
