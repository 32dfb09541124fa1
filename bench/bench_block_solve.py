"""Benchmark of the block-wise quadratic solves of issue 5, one section per workload.

Sections (``--sections``, default all):
  cholesky  batched Cholesky factorisation and solve of B SPD blocks of order n, fp32:
            (4096 x 64^2), (1024 x 128^2), (256 x 512^2) on CUDA; on the CPU by default the same n
            with 1/8 of the blocks (a run of about a minute on 2 cores; ``--full`` for the GPU sizes).
            Solves take r right-hand sides per block (``--rhs``, default 1 and 32: CHITA's backsolve
            and a block of columns) and the factor L of the blocks.
  obs       layer-wise OBS (SparseGPT) on one layer with 128-column blocks, unstructured 50%:
            4096 x 4096 on CUDA, 1024 x 1024 on the CPU by default (``--full``: 4096 x 4096)
  chita     CHITA's L0-constrained solve on one layer, n = 1000 gradients: p = 2^20 (about 1e6)
            weights on CUDA, 2^15 on the CPU by default (``--full``: 2^20), sparsity 0.9

Methods of the cholesky section, timed in the same run on the same inputs:
  torch     torch.linalg.cholesky(A), torch.cholesky_solve(b, L): what users call today
  ours      sparse_engine block_cholesky(A), block_cholesky_solve(L, b): the Triton kernels on
            CUDA, torch.linalg (LAPACK) on the CPU, where the op adds only its checks and damping

Methods of the obs section: ``obs_prune_weight_ref`` (SparseGPT's fasterprune loop in plain torch,
the baseline) and ``obs_prune_weight`` (ours); of the chita section: ``chita_solve_ref`` (the same
algorithm in plain torch, the baseline) and ``chita_solve`` (ours), plus ours on the host on CUDA
runs (the issue's GPU target is GPU against CPU at equal objective).

Before a case is timed, a guard checks every method. cholesky: against float64 torch on the same
fp32 inputs, max over blocks of ||L - L64||_F / ||L64||_F for the factor, ||x - x64|| / ||x64|| for
the solve (x64 = the float64 solve with the same fp32 factor), ours above 1e-4 fails. obs: the exact
pruned count, pruned weights zero, and ours' reconstruction error tr((W - W') H (W - W')^T) within
1e-3 (relative) of the torch loop's. chita: exactly k kept, objective never above magnitude
pruning's, and ours' objective at most 1e-3 (relative) above the plain torch solver's. A failed guard
ends the run (exit status 1, nothing written): timings of a wrong kernel are not reported.

  python bench/bench_block_solve.py                                   # CUDA, the issue's sizes
  python bench/bench_block_solve.py --device cpu                      # CPU, 1/8 of the blocks
  python bench/bench_block_solve.py --device cpu --full               # CPU, the issue's sizes
  python bench/bench_block_solve.py --sizes 512x64 64x256 --rhs 1     # B x n cases of your own
  python bench/bench_block_solve.py --device cpu --sections obs chita    # the solver sections only
  python bench/bench_block_solve.py --device cpu --quick --out-dir /tmp/b   # smoke test

Results: one JSON line per row appended to <out-dir>/block_solve_<device>.jsonl, and the run's
tables rewritten to <out-dir>/block_solve_<device>.md.
"""
import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from record import command_line, device_slug, markdown_table, results_dir, run_metadata, write_results
from timing import Times, copy_gbps, cpu_median_ms, device_median_ms

import sparse_engine
from sparse_engine.ops.block_solve import block_cholesky, block_cholesky_solve
from sparse_engine.pruning import (chita_objective, chita_solve, chita_solve_ref, obs_prune_weight,
                                   obs_prune_weight_ref)

BENCH = "block_solve"
TOLERANCE = 1e-4  # fp32: relative error against float64 torch before a run stops

CHOLESKY_SIZES = {
    "cuda": ((4096, 64), (1024, 128), (256, 512)),
    "cpu": ((512, 64), (128, 128), (32, 512)),
    "quick": ((32, 64), (8, 128), (2, 512)),
}
DEFAULT_RHS = (1, 32)
CPU_ROUNDS, CPU_REPS = 7, 3  # interleaved timing rounds on the CPU, calls per method a round
TARGET_GPU_MAX_N = 128     # the GPU target covers blocks of this order or smaller
TARGET_GPU_SPEEDUP = 5.0   # torch ms / ours ms


class Section(NamedTuple):
    """What a section hands to the report: its rows (also written as JSON lines), its markdown
    (a table and notes), and one line per target of the issue it measures."""
    rows: list[dict]
    markdown: list[str]
    targets: list[str]


# ---- shared helpers ----------------------------------------------------------------------------------

def rotation_sets(set_bytes: int, device: torch.device) -> int:
    """Input sets a timed step cycles through: one on CUDA (do_bench clears L2 before every call),
    on the CPU enough that together they overflow the last-level cache twice (at most 8)."""
    if device.type == "cuda":
        return 1
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        cache = int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        cache = 32 << 20
    return max(1, min(8, math.ceil(2 * cache / max(set_bytes, 1))))


def time_methods(steps: dict[str, Callable[[int], object]], n_sets: int, device: torch.device,
                 quick: bool, rounds: int = CPU_ROUNDS, reps: int = CPU_REPS) -> dict[str, Times]:
    """Each method's time per step. CUDA: do_bench, one method after the other. CPU: interleaved
    rounds (every method timed in every round, in alternating order) whose per-round medians are
    pooled: on a shared host other processes come and go, and interleaving makes every method
    meet the same mix of interference instead of whichever burst fell in its window. ``rounds``
    and ``reps`` (calls per method a round) let sections of second-long steps take fewer."""
    if device.type == "cuda":
        return {name: device_median_ms(step, n_sets, device, quick=quick) for name, step in steps.items()}
    rounds, reps = (2, min(2, reps)) if quick else (rounds, reps)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for k in range(rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
            if reps == 1:  # one call a round, on the round's input set (cpu_median_ms takes >= 2)
                t0 = time.perf_counter()
                steps[name](k % n_sets)
                samples[name].append(1e3 * (time.perf_counter() - t0))
            else:
                t = cpu_median_ms(steps[name], n_sets, warmup=0, min_reps=reps, min_time_s=0.0, max_reps=reps)
                samples[name].append(t.median)
    out = {}
    for name, values in samples.items():
        p20, _, _, p80 = statistics.quantiles(values, n=5, method="inclusive")
        out[name] = Times(statistics.median(values), p20, p80)
    return out


def fail(what: str, problems: list[str]) -> None:
    sys.exit(f"CORRECTNESS GUARD FAILED ({what}): " + "; ".join(problems)
             + ". Nothing was written: timings of a wrong kernel are not reported.")


def fmt(v, spec) -> Optional[str]:
    return None if v is None else format(v, spec)


def spread(t: dict) -> float:
    return (t["ms_p80"] - t["ms_p20"]) / t["ms"]


# ---- cholesky section ----------------------------------------------------------------------------------

CHOLESKY_METHODS = ("torch", "ours")
CHOLESKY_LABELS = {"torch": "torch.linalg", "ours": "block_cholesky[triton]", "ours_cpu": "block_cholesky[cpu]"}


def spd_blocks(batch: int, n: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """fp32 SPD blocks S + 3 sqrt(n) I, S symmetric with N(0, 1) entries: S's eigenvalues lie
    within +-2 sqrt(n) (semicircle law), so the condition number is below ~5, and each block
    costs O(n^2) to make (Wishart blocks would cost a batched n^3 product, minutes on a CPU)."""
    s = torch.randn(batch, n, n, generator=gen, device=device)
    s = (s + s.mT) * (0.5 ** 0.5)
    s.diagonal(dim1=-2, dim2=-1).add_(3 * math.sqrt(n))
    return s


def cholesky_methods() -> dict[str, dict[str, Callable]]:
    """op -> method -> fn; 'factor' fns take A, 'solve' fns take (L, b)."""
    return {
        "factor": {"torch": torch.linalg.cholesky, "ours": lambda a: block_cholesky(a)},
        "solve": {"torch": lambda L, b: torch.cholesky_solve(b, L), "ours": block_cholesky_solve},
    }


def relative_errors(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """Max over blocks of ||out - ref|| / ||ref|| (Frobenius), in float64."""
    diff = (out.double() - ref64).flatten(1).norm(dim=1)
    return (diff / ref64.flatten(1).norm(dim=1).clamp_min(1e-300)).max().item()


def check_cholesky(methods: dict[str, dict[str, Callable]], a: torch.Tensor, factors: dict[str, torch.Tensor],
                   bs: dict[int, torch.Tensor]) -> dict[tuple, float]:
    """Relative errors of every method against float64 torch; ends the run if one of ours exceeds
    TOLERANCE. ``factors``: the fp32 factor of ``a`` each method's solve is given. Returns
    {(op, rhs, method): error}."""
    errors = {}
    L64 = torch.linalg.cholesky(a.double())
    for name, fn in methods["factor"].items():
        errors["factor", 0, name] = relative_errors(fn(a), L64)
    del L64
    for r, b in bs.items():
        x64 = torch.cholesky_solve(b.double(), factors["torch"].double())
        for name, fn in methods["solve"].items():
            errors["solve", r, name] = relative_errors(fn(factors[name], b), x64)
    batch, n = a.shape[0], a.shape[1]
    bad = [f"{op} r={r} {name}: relative error {e:.3g} > {TOLERANCE:g}"
           for (op, r, name), e in errors.items() if name != "torch" and not e <= TOLERANCE]
    if bad:
        fail(f"cholesky, {batch} x {n}^2 fp32, against float64 torch", bad)
    return errors


def cholesky_case(batch: int, n: int, rhs: list[int], device: torch.device, args, meta: dict) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(args.seed)
    methods = cholesky_methods()
    n_sets = 1 if args.quick else rotation_sets(batch * n * n * 4, device)
    sets_a = [spd_blocks(batch, n, device, gen) for _ in range(n_sets)]
    # Each solve gets the factor as its own factorisation returns it: column-major from
    # torch.linalg (what LAPACK and cuSOLVER want), row-major from block_cholesky (what the kernels
    # want); the same values, so neither pays a layout copy that users would not.
    sets_L = {"torch": [torch.linalg.cholesky(a) for a in sets_a]}
    sets_L["ours"] = [L.contiguous() for L in sets_L["torch"]]
    sets_b = {r: [torch.randn(batch, n, r, generator=gen, device=device) for _ in range(n_sets)] for r in rhs}
    errors = check_cholesky(methods, sets_a[0], {m: sets_L[m][0] for m in sets_L}, {r: sets_b[r][0] for r in rhs})

    rows = []
    ops = [("factor", 0)] + [("solve", r) for r in rhs]
    for op, r in ops:
        steps = {}
        for name, fn in methods[op].items():
            if op == "factor":
                steps[name] = lambda i, fn=fn: fn(sets_a[i])
            else:
                steps[name] = lambda i, fn=fn, r=r, L=sets_L[name]: fn(L[i], sets_b[r][i])
            steps[name](0)  # warm: compilation, thread pools, first-touch buffers
        times = time_methods(steps, n_sets, device, args.quick)
        flops = batch * (n ** 3 / 3 if op == "factor" else 2 * n * n * r)
        # Bytes a step must move at least: A read and L written (half of each is the triangle that
        # matters, but both methods touch whole blocks); L, b read and x written for a solve.
        nbytes = 4 * batch * (2 * n * n if op == "factor" else n * n + 2 * n * r)
        for name, t in times.items():
            label = CHOLESKY_LABELS["ours_cpu" if name == "ours" and device.type == "cpu" else name]
            rows.append({
                **meta, "bench": BENCH, "section": "cholesky", "op": op, "method": name, "label": label,
                "batch": batch, "n": n, "rhs": r if op == "solve" else None, "dtype": "float32",
                "input_sets": n_sets, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
                "gflops": flops / t.median / 1e6, "gbps": nbytes / t.median / 1e6,
                "speedup_vs_torch": times["torch"].median / t.median,
                "rel_err_vs_fp64": errors[op, r, name],
            })
    return rows


CHOLESKY_COLUMNS = [
    ("B x n^2", lambda r: f"{r['batch']} x {r['n']}^2"),
    ("op", lambda r: r["op"] if r["op"] == "factor" else f"solve r={r['rhs']}"),
    ("method", lambda r: r["label"]),
    ("ms", lambda r: f"{r['ms']:.4g}"),
    ("spread %", lambda r: f"{100 * spread(r):.1f}"),
    ("GFLOP/s", lambda r: f"{r['gflops']:.4g}"),
    ("GB/s", lambda r: f"{r['gbps']:.4g}"),
    ("speedup vs torch", lambda r: f"{r['speedup_vs_torch']:.3g}"),
    ("rel. err vs fp64", lambda r: f"{r['rel_err_vs_fp64']:.2g}"),
]


def cholesky_targets(rows: list[dict], device: torch.device) -> list[str]:
    """GPU: ours >= 5x torch for n <= 128, factor and solves. CPU: ours no slower than torch, read
    against the noise: met when ours ms <= torch ms x (1 + the larger of the two rows' spreads)."""
    lines = []
    by = {(r["op"], r["rhs"], r["batch"], r["n"], r["method"]): r for r in rows}
    for r in rows:
        if r["method"] == "torch":
            continue
        base = by[r["op"], r["rhs"], r["batch"], r["n"], "torch"]
        case = f"{r['op'] if r['op'] == 'factor' else 'solve r=' + str(r['rhs'])} {r['batch']} x {r['n']}^2"
        if device.type == "cuda":
            if r["n"] > TARGET_GPU_MAX_N:
                continue
            ok = r["speedup_vs_torch"] >= TARGET_GPU_SPEEDUP
            lines.append(f"{'met    ' if ok else 'NOT met'}  torch ms / ours ms = {r['speedup_vs_torch']:.3g} "
                         f"(target >= {TARGET_GPU_SPEEDUP:g}, blocks of {TARGET_GPU_MAX_N} or smaller)   {case}")
        else:
            noise = max(spread(r), spread(base))
            ok = r["ms"] <= base["ms"] * (1 + noise)
            lines.append(f"{'met    ' if ok else 'NOT met'}  ours ms / torch ms = {r['ms'] / base['ms']:.3g} "
                         f"(target <= 1 + noise {noise:.3g}: no slower than torch)   {case}")
    if device.type == "cuda" and not lines:
        lines.append(f"n/a      the GPU target is for blocks of {TARGET_GPU_MAX_N} or smaller: none in this run")
    return lines


def cholesky_section(device: torch.device, args, meta: dict) -> Section:
    sizes = args.sizes or CHOLESKY_SIZES["quick" if args.quick else "cuda" if device.type == "cuda" or args.full
                                         else "cpu"]
    rows = []
    for batch, n in sizes:
        print(f"cholesky: {batch} x {n}^2 fp32, rhs {list(args.rhs)}", flush=True)
        rows += cholesky_case(batch, n, list(args.rhs), device, args, meta)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = [
        "## Cholesky: batched factorisation and solve, fp32",
        "",
        "- blocks: S + 3 sqrt(n) I, S symmetric N(0, 1) (condition number < ~5); solves use the blocks' "
        "fp32 factor and r random right-hand sides per block",
        "- torch.linalg: `torch.linalg.cholesky(A)` / `torch.cholesky_solve(b, L)`; ours: `block_cholesky(A)` / "
        "`block_cholesky_solve(L, b)` (damp 0), " + ("the Triton kernels" if device.type == "cuda" else
                                                     "torch.linalg under the op's checks on the CPU"),
        "- GFLOP/s: n^3/3 per factorisation, 2 n^2 r per solve; GB/s: bytes a step must move at least "
        "(factor: A read + L written; solve: L and b read, x written) / time",
        "- rel. err vs fp64: max over blocks of ||out - out64|| / ||out64|| against float64 torch on the same "
        f"fp32 inputs (the guard: ours <= {TOLERANCE:g})",
        "",
        markdown_table(rows, CHOLESKY_COLUMNS),
        "",
    ]
    return Section(rows, md, cholesky_targets(rows, device))


def cpu_timing_note(device: torch.device, args, rounds: int, reps: int) -> list[str]:
    """The timing rule of a section that takes fewer CPU calls than the header's (seconds a call)."""
    if device.type == "cuda":
        return []
    rounds, reps = (2, min(2, reps)) if args.quick else (rounds, reps)
    return [f"- timing on the CPU here: {rounds} interleaved rounds of {reps} call{'s' if reps > 1 else ''} per "
            f"method (a call takes up to seconds), ms = median of the rounds; the guard's call is the warm-up"]


# ---- obs section ---------------------------------------------------------------------------------------

OBS_SHAPES = {"cuda": (4096, 4096), "cpu": (1024, 1024), "quick": (96, 200)}
OBS_SPARSITY, OBS_BLOCK, OBS_DAMP = 0.5, 128, 0.01
OBS_ROUNDS, OBS_REPS = CPU_ROUNDS, 1  # CPU: the torch loop takes seconds a call at 1024 x 1024
OBS_ERROR_RTOL = 1e-3      # the "same reconstruction error": |err - err_loop| / err_loop
TARGET_GPU_OBS_SPEEDUP = 3.0
OBS_LABELS = {"torch_loop": "obs_prune_weight_ref (torch loop)", "ours": "obs_prune_weight"}


class ObsProblem(NamedTuple):
    W: torch.Tensor  # (rows, cols) fp32
    H: torch.Tensor  # (cols, cols) fp32, 2/n X^T X


def obs_problem(rows: int, cols: int, device: torch.device, gen: torch.Generator) -> ObsProblem:
    """A layer ``W ~ N(0, 1/cols)`` and the Hessian ``2/n X^T X`` of n = 2 cols calibration inputs
    with correlated features (a rank-cols/8 shared part plus noise, column scales over an order of
    magnitude), as a layer's inputs are: an isotropic H would make OBS plain magnitude pruning."""
    n, r = 2 * cols, max(1, cols // 8)
    scale = (0.5 * torch.randn(cols, generator=gen, device=device)).exp()
    X = (torch.randn(n, r, generator=gen, device=device) @ torch.randn(r, cols, generator=gen, device=device)
         / math.sqrt(r) + 0.3 * torch.randn(n, cols, generator=gen, device=device)) * scale
    H = (2.0 / n) * (X.T @ X)
    W = torch.randn(rows, cols, generator=gen, device=device) / math.sqrt(cols)
    return ObsProblem(W, (H + H.T) / 2)


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T)`` in float64: twice the layer's mean squared output error."""
    D = (W - W_new).double()
    return float(((D @ H.double()) * D).sum())


def obs_methods(sparsity: float, block: int, damp: float) -> dict[str, Callable[[ObsProblem], tuple]]:
    return {"torch_loop": lambda p: obs_prune_weight_ref(p.W, p.H, sparsity, block, damp),
            "ours": lambda p: obs_prune_weight(p.W, p.H, sparsity, block, damp)}


def check_obs(methods: dict[str, Callable], problem: ObsProblem, sparsity: float) -> dict[str, dict]:
    """Runs every method once: the exact pruned count, finite weights, pruned entries zero, and
    ours' reconstruction error within OBS_ERROR_RTOL of the torch loop's; ends the run otherwise.
    Returns {method: {"err", "rel_err_vs_loop"}}, with magnitude pruning's error under "magnitude"."""
    W, H = problem
    n_prune = round(sparsity * W.numel())  # target_kept's rounding
    out, bad = {}, []
    for name, fn in methods.items():
        W_new, keep = fn(problem)
        pruned = int((~keep).sum())
        if pruned != n_prune:
            bad.append(f"{name}: {pruned} weights pruned, expected {n_prune}")
        if not torch.isfinite(W_new).all() or (W_new[~keep] != 0).any():
            bad.append(f"{name}: non-finite weights, or pruned weights not zero")
        out[name] = {"err": reconstruction_error(W, W_new, H)}
    ref = out["torch_loop"]["err"]
    for name, r in out.items():
        r["rel_err_vs_loop"] = abs(r["err"] - ref) / ref
        if name != "torch_loop" and not r["rel_err_vs_loop"] <= OBS_ERROR_RTOL:
            bad.append(f"{name}: reconstruction error {r['err']:.6g} vs the torch loop's {ref:.6g} "
                       f"(relative difference {r['rel_err_vs_loop']:.3g} > {OBS_ERROR_RTOL:g})")
    if bad:
        fail(f"obs, {W.shape[0]} x {W.shape[1]} layer at sparsity {sparsity:g}", bad)
    flat = W.abs().flatten()
    keep_mag = torch.zeros_like(flat, dtype=torch.bool)
    keep_mag[flat.topk(W.numel() - n_prune).indices] = True
    out["magnitude"] = {"err": reconstruction_error(W, W * keep_mag.view_as(W), H)}
    return out


def obs_section(device: torch.device, args, meta: dict) -> Section:
    rows_, cols = args.obs_shape or OBS_SHAPES["quick" if args.quick else "cuda" if device.type == "cuda" or args.full
                                               else "cpu"]
    s, block, damp = args.obs_sparsity, args.obs_block, OBS_DAMP
    print(f"obs: {rows_} x {cols} layer, sparsity {s:g}, {block}-column blocks, fp32", flush=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    n_sets = 1 if args.quick else rotation_sets(4 * (rows_ * cols + cols * cols), device)
    problems = [obs_problem(rows_, cols, device, gen) for _ in range(n_sets)]
    methods = obs_methods(s, block, damp)
    errors = check_obs(methods, problems[0], s)
    steps = {name: (lambda i, fn=fn: fn(problems[i])) for name, fn in methods.items()}
    times = time_methods(steps, n_sets, device, args.quick, OBS_ROUNDS, OBS_REPS)
    rows = []
    for name, t in times.items():
        rows.append({
            **meta, "bench": BENCH, "section": "obs", "method": name, "label": OBS_LABELS[name],
            "rows": rows_, "cols": cols, "block": block, "sparsity": s, "damp": damp, "dtype": "float32",
            "input_sets": n_sets, "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
            "speedup_vs_torch": times["torch_loop"].median / t.median,
            "recon_err": errors[name]["err"], "rel_err_vs_loop": errors[name]["rel_err_vs_loop"],
            "err_vs_magnitude": errors[name]["err"] / errors["magnitude"]["err"],
        })
    md = [
        "## Layer-wise OBS (SparseGPT): one layer, fp32",
        "",
        f"- layer W ~ N(0, 1/cols), Hessian H = 2/n X^T X of n = 2 cols correlated calibration inputs; "
        f"unstructured sparsity {s:g} (exact count per layer), {block}-column blocks, damp {damp:g}",
        "- torch loop: `obs_prune_weight_ref`, SparseGPT's `fasterprune` transcribed (the baseline); ours: "
        "`obs_prune_weight` (one flipped Cholesky and a triangular inverse, transposed sweep, lazy sub-blocks)",
        "- recon. err: tr((W - W') H (W - W')^T) in float64; vs loop: |err - err_loop| / err_loop (the guard: "
        f"<= {OBS_ERROR_RTOL:g}); vs magnitude: err / the error of magnitude pruning at the same count",
        *cpu_timing_note(device, args, OBS_ROUNDS, OBS_REPS),
        "",
        markdown_table(rows, OBS_COLUMNS),
        "",
    ]
    return Section(rows, md, obs_targets(rows, device))


OBS_COLUMNS = [
    ("layer", lambda r: f"{r['rows']} x {r['cols']}"),
    ("method", lambda r: r["label"]),
    ("ms", lambda r: f"{r['ms']:.4g}"),
    ("spread %", lambda r: f"{100 * spread(r):.1f}"),
    ("speedup vs torch loop", lambda r: f"{r['speedup_vs_torch']:.3g}"),
    ("recon. err", lambda r: f"{r['recon_err']:.6g}"),
    ("vs loop", lambda r: f"{r['rel_err_vs_loop']:.2g}"),
    ("vs magnitude", lambda r: f"{r['err_vs_magnitude']:.3g}"),
]


def obs_targets(rows: list[dict], device: torch.device) -> list[str]:
    """GPU: ours >= 3x the torch loop with the same error (1e-3 relative); CPU: no slower (read
    against the noise, as the cholesky section) with the same error."""
    base = next(r for r in rows if r["method"] == "torch_loop")
    r = next(r for r in rows if r["method"] == "ours")
    case = f"{r['rows']} x {r['cols']}, err within {r['rel_err_vs_loop']:.2g} of the loop's"
    same = r["rel_err_vs_loop"] <= OBS_ERROR_RTOL
    if device.type == "cuda":
        ok = same and r["speedup_vs_torch"] >= TARGET_GPU_OBS_SPEEDUP
        return [f"{'met    ' if ok else 'NOT met'}  torch loop ms / ours ms = {r['speedup_vs_torch']:.3g} "
                f"(target >= {TARGET_GPU_OBS_SPEEDUP:g}, error within {OBS_ERROR_RTOL:g})   {case}"]
    noise = max(spread(r), spread(base))
    ok = same and r["ms"] <= base["ms"] * (1 + noise)
    return [f"{'met    ' if ok else 'NOT met'}  ours ms / torch loop ms = {r['ms'] / base['ms']:.3g} (target <= 1 + "
            f"noise {noise:.3g}: no slower, error within {OBS_ERROR_RTOL:g})   {case}"]


# ---- chita section -------------------------------------------------------------------------------------

CHITA_SHAPES = {"cuda": (1000, 1 << 20), "cpu": (1000, 1 << 15), "quick": (64, 2000)}  # (n gradients, p weights)
CHITA_SPARSITY = 0.9
CHITA_L2_FRACTION = 0.05  # l2 = this * mean(diag X^T X): the chita default's ratio on a trained MLP
CHITA_ROUNDS, CHITA_REPS = 3, 1  # CPU: solves take seconds
CHITA_OBJ_RTOL = 1e-3     # ours' Q may exceed the plain torch solver's by at most this (relative)
TARGET_GPU_CHITA_SPEEDUP = 20.0  # ours on CPU ms / ours on GPU ms, at equal objective
CHITA_LABELS = {"torch_ref": "chita_solve_ref (plain torch)", "ours": "chita_solve", "ours_cpu": "chita_solve[cpu]"}


class ChitaProblem(NamedTuple):
    X: torch.Tensor   # (n, p) fp32 scaled gradients
    w0: torch.Tensor  # (p,)
    k: int
    l2: float


def chita_problem(n: int, p: int, sparsity: float, device: torch.device, gen: torch.Generator) -> ChitaProblem:
    """Gradients X / sqrt(n) with N(0, 1) entries and column scales over an order of magnitude (a
    network's Fisher diagonal spreads like that, and magnitude pruning is then far from optimal),
    weights w0 ~ N(0, 1), k = p - round(sparsity p), l2 = CHITA_L2_FRACTION * mean(diag X^T X)."""
    scale = (0.5 * torch.randn(p, generator=gen, device=device)).exp()
    X = torch.randn(n, p, generator=gen, device=device).mul_(scale / math.sqrt(n))
    w0 = torch.randn(p, generator=gen, device=device)
    l2 = CHITA_L2_FRACTION * float(X.square().sum(0).mean())
    return ChitaProblem(X, w0, p - round(sparsity * p), l2)


def chita_methods() -> dict[str, Callable[[ChitaProblem], tuple]]:
    return {"torch_ref": lambda q: chita_solve_ref(q.X, q.w0, q.k, q.l2),
            "ours": lambda q: chita_solve(q.X, q.w0, q.k, q.l2)}


def check_chita(methods: dict[str, Callable], problem: ChitaProblem) -> dict[str, dict]:
    """Runs every method once: exactly k kept, zeros outside, finite, Q never above magnitude
    pruning's, and ours' Q at most CHITA_OBJ_RTOL above the plain torch solver's (lower is
    better, not an error); ends the run otherwise. Returns {method: {"obj", "rel_obj_vs_ref"}},
    with magnitude pruning's Q under "magnitude"."""
    X, w0, k, l2 = problem
    keep_mag = torch.zeros_like(w0, dtype=torch.bool)
    keep_mag[w0.abs().topk(k).indices] = True
    q_mag = float(chita_objective(X.double(), (w0 * keep_mag).double(), w0.double(), l2))
    out, bad = {}, []
    for name, fn in methods.items():
        w, keep = fn(problem)
        q = float(chita_objective(X.double(), w.double(), w0.double(), l2))
        if int(keep.sum()) != k:
            bad.append(f"{name}: {int(keep.sum())} weights kept, expected {k}")
        if not torch.isfinite(w).all() or (w[~keep] != 0).any():
            bad.append(f"{name}: non-finite weights, or weights outside the support not zero")
        if not q <= q_mag:
            bad.append(f"{name}: objective {q:.6g} above magnitude pruning's {q_mag:.6g}")
        out[name] = {"obj": q}
    ref = out["torch_ref"]["obj"]
    for name, r in out.items():
        r["rel_obj_vs_ref"] = (r["obj"] - ref) / ref
        if name != "torch_ref" and not r["rel_obj_vs_ref"] <= CHITA_OBJ_RTOL:
            bad.append(f"{name}: objective {r['obj']:.6g} above the plain torch solver's {ref:.6g} "
                       f"(relative {r['rel_obj_vs_ref']:.3g} > {CHITA_OBJ_RTOL:g})")
    if bad:
        fail(f"chita, n = {X.shape[0]}, p = {X.shape[1]}, k = {k}", bad)
    out["magnitude"] = {"obj": q_mag}
    return out


def chita_section(device: torch.device, args, meta: dict) -> Section:
    n, p = args.chita_shape or CHITA_SHAPES["quick" if args.quick else "cuda" if device.type == "cuda" or args.full
                                            else "cpu"]
    s = args.chita_sparsity
    print(f"chita: one layer of p = {p} weights, n = {n} gradients, sparsity {s:g}, fp32", flush=True)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    problem = chita_problem(n, p, s, device, gen)  # one set: X alone overflows any cache but a toy's
    methods = chita_methods()
    objs = check_chita(methods, problem)
    steps = {name: (lambda i, fn=fn: fn(problem)) for name, fn in methods.items()}
    times = time_methods(steps, 1, device, args.quick, CHITA_ROUNDS, CHITA_REPS)
    if device.type == "cuda":
        # The GPU target compares with ours on the CPU at equal objective: the same problem,
        # copied to the host, solved (and timed) there too.
        cpu_problem = ChitaProblem(problem.X.cpu(), problem.w0.cpu(), problem.k, problem.l2)
        w, _ = chita_solve(*cpu_problem)
        q = float(chita_objective(cpu_problem.X.double(), w.double(), cpu_problem.w0.double(), problem.l2))
        objs["ours_cpu"] = {"obj": q, "rel_obj_vs_ref": (q - objs["torch_ref"]["obj"]) / objs["torch_ref"]["obj"]}
        times["ours_cpu"] = cpu_median_ms(lambda i: chita_solve(*cpu_problem), 1, warmup=0, min_reps=2,
                                          min_time_s=0.0, max_reps=2)
    rows = []
    for name, t in times.items():
        rows.append({
            **meta, "bench": BENCH, "section": "chita", "method": name, "label": CHITA_LABELS[name],
            "n": n, "p": p, "k": problem.k, "sparsity": s, "l2": problem.l2, "dtype": "float32",
            "solve_device": "cpu" if name == "ours_cpu" else device.type,
            "ms": t.median, "ms_p20": t.p20, "ms_p80": t.p80,
            "speedup_vs_torch": times["torch_ref"].median / t.median,
            "objective": objs[name]["obj"], "rel_obj_vs_ref": objs[name]["rel_obj_vs_ref"],
            "obj_vs_magnitude": objs[name]["obj"] / objs["magnitude"]["obj"],
        })
    md = [
        "## CHITA: one layer, L0-constrained least squares on a low-rank Fisher, fp32",
        "",
        f"- X: n = {n} gradients / sqrt(n) of p = {p} weights, N(0, 1) entries, column scales exp(N(0, 1/4)); "
        f"w0 ~ N(0, 1); keep k = {problem.k} (sparsity {s:g}); l2 = {CHITA_L2_FRACTION:g} mean(diag X^T X) = "
        f"{problem.l2:.4g}; defaults of both solvers (100 IHT iterations a round, 3 rounds, step search, backsolve)",
        "- plain torch: `chita_solve_ref` (the same algorithm on one vector, objectives recomputed, textbook "
        "support solve in float64; the baseline); ours: `chita_solve`"
        + ("; chita_solve[cpu]: ours on the host, same problem (the GPU target's denominator)"
           if device.type == "cuda" else ""),
        "- objective Q(w) = 1/2 ||X (w - w0)||^2 + l2/2 ||w - w0||^2 in float64; vs ref: (Q - Q_ref) / Q_ref (the "
        f"guard: <= {CHITA_OBJ_RTOL:g}, lower is better); vs magnitude: Q / Q of magnitude pruning (never above 1)",
        *cpu_timing_note(device, args, CHITA_ROUNDS, CHITA_REPS),
        *(["- chita_solve[cpu]: 2 calls on the host, ms = their median"] if device.type == "cuda" else []),
        "",
        markdown_table(rows, CHITA_COLUMNS),
        "",
    ]
    return Section(rows, md, chita_targets(rows, device))


CHITA_COLUMNS = [
    ("n x p", lambda r: f"{r['n']} x {r['p']}"),
    ("method", lambda r: r["label"]),
    ("device", lambda r: r["solve_device"]),
    ("ms", lambda r: f"{r['ms']:.4g}"),
    ("spread %", lambda r: f"{100 * spread(r):.1f}"),
    ("speedup vs torch", lambda r: f"{r['speedup_vs_torch']:.3g}"),
    ("objective", lambda r: f"{r['objective']:.6g}"),
    ("vs ref", lambda r: f"{r['rel_obj_vs_ref']:.2g}"),
    ("vs magnitude", lambda r: f"{r['obj_vs_magnitude']:.3g}"),
]


def chita_targets(rows: list[dict], device: torch.device) -> list[str]:
    """GPU: ours >= 20x ours on the CPU at equal objective (1e-3 relative); CPU: ours no slower
    than the plain torch solver (read against the noise) at an objective no worse."""
    by = {r["method"]: r for r in rows}
    ours, base = by["ours"], by["torch_ref"]
    if device.type == "cuda":
        host = by["ours_cpu"]
        speedup = host["ms"] / ours["ms"]
        equal = abs(ours["objective"] - host["objective"]) <= CHITA_OBJ_RTOL * abs(host["objective"])
        ok = equal and speedup >= TARGET_GPU_CHITA_SPEEDUP
        return [f"{'met    ' if ok else 'NOT met'}  ours on CPU ms / ours on GPU ms = {speedup:.3g} (target >= "
                f"{TARGET_GPU_CHITA_SPEEDUP:g} at equal objective: GPU {ours['objective']:.6g}, CPU "
                f"{host['objective']:.6g})   n = {ours['n']}, p = {ours['p']}"]
    noise = max(spread(ours), spread(base))
    ok = ours["ms"] <= base["ms"] * (1 + noise) and ours["rel_obj_vs_ref"] <= CHITA_OBJ_RTOL
    return [f"{'met    ' if ok else 'NOT met'}  ours ms / plain torch ms = {ours['ms'] / base['ms']:.3g} (target <= "
            f"1 + noise {noise:.3g}: no slower, objective no worse)   n = {ours['n']}, p = {ours['p']}"]


SECTIONS: dict[str, Callable[[torch.device, argparse.Namespace, dict], Section]] = {
    "cholesky": cholesky_section,
    "obs": obs_section,
    "chita": chita_section,
}


# ---- report and command line ---------------------------------------------------------------------

def markdown(sections: dict[str, Section], meta: dict, command: str) -> str:
    cuda = meta["device_type"] == "cuda"
    header = [
        f"# block_solve benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, git {meta['git_sha']}, torch {meta['torch']}, triton {meta['triton']}"
        + (f", CUDA {meta['cuda']}" if cuda else f", {meta['cpu_threads']} CPU threads"),
        f"- command: `{command}`",
        *([] if cuda else [f"- host load average (1 min) at the start: {meta['load_avg_1min']:.2f} on "
                           f"{meta['cpu_count']} CPUs (a load near or above the CPU count means other processes "
                           "competed for the cores: read the spreads)"]),
        f"- ceiling, measured once: copy {meta['copy_gbps']:.4g} GB/s (bytes read + written, "
        f"{meta['copy_bytes'] / 2**20:.0f} MiB copied)",
        "- ms: median after warm-up; " + ("`triton.testing.do_bench` (CUDA events around each call, L2 cleared "
                                          "before it)" if cuda else "time.perf_counter around each call, rotating "
                                          "over input sets that together overflow the last-level cache; the methods "
                                          f"of a case are timed in {CPU_ROUNDS} interleaved rounds (median of "
                                          f"{CPU_REPS} calls a round), ms = median of the rounds"),
        "- spread % = (80th - 20th percentile) / median" + ("" if cuda else " (of the rounds)")
        + "; a speedup nearer 1 than the spreads is noise",
        "- speedup vs torch = torch's ms / this row's ms, same case (> 1: this row is faster)",
        "",
    ]
    body, targets = [], []
    for name, section in sections.items():
        body += section.markdown
        targets += [f"{name}: {t}" for t in section.targets]
    return "\n".join(header + body + ["## Targets (measured in this run)", "", *(f"- {t}" for t in targets), ""])


def parse_size(text: str) -> tuple[int, int]:
    try:
        batch, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a case B x n such as 1024x128, got {text!r}")
    if batch < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"expected B >= 1 and n >= 1, got {text!r}")
    return batch, n


def parse_shape(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape AxB such as 1024x1024, got {text!r}")
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
    return a, b


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS))
    p.add_argument("--sizes", nargs="+", type=parse_size, metavar="BxN",
                   help="cholesky cases, blocks x order (default: the issue's sizes on CUDA, 1/8 of the blocks on CPU)")
    p.add_argument("--rhs", nargs="+", type=int, default=list(DEFAULT_RHS), help="right-hand sides per block")
    p.add_argument("--full", action="store_true", help="CPU: the issue's (GPU) sizes")
    p.add_argument("--obs-shape", type=parse_shape, metavar="ROWSxCOLS",
                   help="obs layer (default: 4096x4096 on CUDA or with --full, 1024x1024 on the CPU)")
    p.add_argument("--obs-sparsity", type=float, default=OBS_SPARSITY)
    p.add_argument("--obs-block", type=int, default=OBS_BLOCK, help="obs column block")
    p.add_argument("--chita-shape", type=parse_shape, metavar="NxP",
                   help="chita gradients x weights (default: 1000x1048576 on CUDA or with --full, 1000x32768 on "
                        "the CPU)")
    p.add_argument("--chita-sparsity", type=float, default=CHITA_SPARSITY)
    p.add_argument("--out-dir", type=Path, help="default: bench/results (with --quick, a fresh temporary directory)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: the smoke test")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive count, got {args.threads}")
    if any(r < 1 for r in args.rhs):
        p.error(f"--rhs: expected positive counts, got {args.rhs}")
    for name in ("obs_sparsity", "chita_sparsity"):
        if not 0.0 < getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')}: expected a number in (0, 1), got {getattr(args, name)}")
    if args.obs_block < 1:
        p.error(f"--obs-block: expected a positive column count, got {args.obs_block}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    command = command_line("bench_block_solve.py", argv)

    meta = run_metadata(device)
    meta["sparse_engine"] = sparse_engine.__version__
    meta["quick"] = args.quick
    meta["timer"] = "do_bench" if device.type == "cuda" else "perf_counter"
    meta["load_avg_1min"] = os.getloadavg()[0]
    meta["cpu_count"] = os.cpu_count()
    meta["copy_bytes"] = (1 << 30 if device.type == "cuda" else 256 << 20) >> (4 if args.quick else 0)
    meta["copy_gbps"] = copy_gbps(device, meta["copy_bytes"], quick=args.quick)
    print(f"{meta['device']}: copy {meta['copy_gbps']:.4g} GB/s (read + written)", flush=True)

    sections = {name: SECTIONS[name](device, args, meta) for name in args.sections}
    rows = [row for s in sections.values() for row in s.rows]
    name = f"{BENCH}_{device_slug(device)}"
    write_results(out_dir, name, rows, markdown(sections, meta, command))


if __name__ == "__main__":
    main()
