"""Benchmark of the block-wise quadratic solves of issue 5, one section per workload.

Sections (``--sections``, default all):
  cholesky  batched Cholesky factorisation and solve of B SPD blocks of order n, fp32:
            (4096 x 64^2), (1024 x 128^2), (256 x 512^2) on CUDA; on the CPU by default the same n
            with 1/8 of the blocks (a run of about a minute on 2 cores; ``--full`` for the GPU sizes).
            Solves take r right-hand sides per block (``--rhs``, default 1 and 32: CHITA's backsolve
            and a block of columns) and the factor L of the blocks.
  (obs, chita: to come, each a function returning a Section, registered in SECTIONS)

Methods of the cholesky section, timed in the same run on the same inputs:
  torch     torch.linalg.cholesky(A), torch.cholesky_solve(b, L): what users call today
  ours      sparse_engine block_cholesky(A), block_cholesky_solve(L, b): the Triton kernels on
            CUDA, torch.linalg (LAPACK) on the CPU, where the op adds only its checks and damping

Before a case is timed, a guard compares every method with float64 torch on the same fp32 inputs:
max over blocks of ||L - L64||_F / ||L64||_F for the factor, ||x - x64|| / ||x64|| for the solve
(x64 = the float64 solve with the same fp32 factor). Ours above 1e-4 ends the run (exit status 1,
nothing written): timings of a wrong kernel are not reported.

  python bench/bench_block_solve.py                                   # CUDA, the issue's sizes
  python bench/bench_block_solve.py --device cpu                      # CPU, 1/8 of the blocks
  python bench/bench_block_solve.py --device cpu --full               # CPU, the issue's sizes
  python bench/bench_block_solve.py --sizes 512x64 64x256 --rhs 1     # B x n cases of your own
  python bench/bench_block_solve.py --device cpu --quick --out-dir /tmp/b   # smoke test

Results: one JSON line per row appended to <out-dir>/block_solve_<device>.jsonl, and the run's
tables rewritten to <out-dir>/block_solve_<device>.md.
"""
import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from record import REPO, append_jsonl, device_slug, markdown_table, run_metadata
from timing import Times, copy_gbps, cpu_median_ms, device_median_ms

import sparse_engine
from sparse_engine.ops.block_solve import block_cholesky, block_cholesky_solve

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
                 quick: bool) -> dict[str, Times]:
    """Each method's time per step. CUDA: do_bench, one method after the other. CPU: interleaved
    rounds (every method timed in every round, in alternating order) whose per-round medians are
    pooled: on a shared host other processes come and go, and interleaving makes every method
    meet the same mix of interference instead of whichever burst fell in its window."""
    if device.type == "cuda":
        return {name: device_median_ms(step, n_sets, device, quick=quick) for name, step in steps.items()}
    rounds, reps = (2, 2) if quick else (CPU_ROUNDS, CPU_REPS)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for k in range(rounds):
        for name in (names if k % 2 == 0 else names[::-1]):
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


SECTIONS: dict[str, Callable[[torch.device, argparse.Namespace, dict], Section]] = {
    "cholesky": cholesky_section,
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS))
    p.add_argument("--sizes", nargs="+", type=parse_size, metavar="BxN",
                   help="cholesky cases, blocks x order (default: the issue's sizes on CUDA, 1/8 of the blocks on CPU)")
    p.add_argument("--rhs", nargs="+", type=int, default=list(DEFAULT_RHS), help="right-hand sides per block")
    p.add_argument("--full", action="store_true", help="CPU: the issue's (GPU) sizes")
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
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir or (Path(tempfile.mkdtemp(prefix="bench_block_solve_")) if args.quick
                               else REPO / "bench" / "results")
    command = " ".join(["python", "bench/bench_block_solve.py", *(argv if argv is not None else sys.argv[1:])])

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
    append_jsonl(out_dir / f"{name}.jsonl", rows)
    text = markdown(sections, meta, command)
    (out_dir / f"{name}.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out_dir / (name + '.md')} and appended {len(rows)} rows to {out_dir / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
