"""Benchmark of masked_linear against what users run today, forward, backward and both.

Methods, each timed in the same run on the same inputs:
  dense     F.linear(x, W): the floor, no mask at all (its bf16 forward at the largest shape is
            also the matmul ceiling every TFLOP/s is compared with)
  wm        F.linear(x, W*M) under autograd, W*M built inside the timed region from a bool mask
            (1 byte a weight, the cheapest mask users keep) and kept by autograd for backward
  prune     nn.Linear under torch.nn.utils.prune.custom_from_mask, through the module's forward,
            whose pre-hook rebuilds weight_orig * weight_mask each call
  ours_*    sparse_engine.masked_linear: backend triton, and cuda when the C++ CUDA kernels are
            built; on CPU the one CPU kernel

Before a shape is timed, each of our kernels is checked against a higher-precision F.linear(x, W*M)
(forward and both gradients) on that shape; a failure ends the run before anything is written.

  python bench/bench_masked_linear.py                        # CUDA: bf16 + fp16, training and decode
  python bench/bench_masked_linear.py --device cpu           # CPU kernel, fp32, smaller shapes
  python bench/bench_masked_linear.py --shapes 8192x4096x11008 1x4096x4096 --sparsity 0.5 0.9
  python bench/bench_masked_linear.py --device cpu --quick --out-dir /tmp/b   # smoke test

Shapes are MxKxN (tokens x in_features x out_features). Results: one JSON line per (method,
shape, dtype, sparsity, pass) appended to <out-dir>/masked_linear_<device>.jsonl, and the run's
table rewritten to <out-dir>/masked_linear_<device>.md.
"""
import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.utils import prune

from record import command_line, device_slug, markdown_table, results_dir, run_metadata, write_results
from timing import Times, cpu_median_ms, cuda_events_ms, cuda_graph_ms, cuda_peak_bytes

import sparse_engine
from sparse_engine import _C, masked_linear, pack_mask

BENCH = "masked_linear"
PASSES = ("fwd", "bwd", "fwd+bwd")
FLOPS_PER_MNK = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative error norm a kernel may show against the fp32/fp64 reference before the run stops.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Up to this many tokens a shape counts as decode: memory-bound, microseconds of device work.
DECODE_MAX_TOKENS = 64

CUDA_WEIGHTS = ((4096, 4096), (4096, 11008), (11008, 4096))
CPU_WEIGHTS = ((1024, 1024), (1024, 2752), (2752, 1024))
DEFAULT_SHAPES = {
    "cuda": [(8192, k, n) for k, n in CUDA_WEIGHTS] + [(m, k, n) for m in (1, 16, 64) for k, n in CUDA_WEIGHTS],
    "cpu": [(256, k, n) for k, n in CPU_WEIGHTS] + [(m, k, n) for m in (1, 16, 64) for k, n in CPU_WEIGHTS],
    # K = 100 leaves padding bits in the last mask word of each row.
    "quick": [(128, 96, 160), (16, 100, 72), (1, 96, 160)],
}

LABELS = {
    "dense": "F.linear (dense)",
    "wm": "F.linear(x, W*M)",
    "prune": "nn.utils.prune",
    "ours_triton": "masked_linear[triton]",
    "ours_cuda": "masked_linear[cuda]",
    "ours_cpu": "masked_linear[cpu]",
}
BASELINES = ("dense", "wm", "prune")

# Targets of the issue, checked on the measured numbers of this run.
TARGET_FWDBWD_OVER_DENSE = 1.10   # ours_ms / dense_ms, fwd+bwd, training shapes
TARGET_SPEEDUP_VS_WM_TRAIN = 1.05  # wm_ms / ours_ms, fwd+bwd, training shapes
TARGET_SPEEDUP_VS_WM_DECODE = 2.5  # wm_ms / ours_ms, fwd, decode shapes
TARGET_BF16_WEIGHT_PER_MASK = 16   # bf16 weight bytes / mask bytes


# ---- inputs and methods --------------------------------------------------------------------------

@dataclass
class InputSet:
    """One set of operands; every method reads the same tensors (prune's weight_orig is weight)."""
    x: torch.Tensor
    weight: torch.nn.Parameter
    keep: torch.Tensor
    bits: torch.Tensor
    dy: torch.Tensor
    pruned: torch.nn.Linear

    def clear_grads(self) -> None:
        self.x.grad = None
        self.weight.grad = None


def make_input_set(M: int, K: int, N: int, dtype: torch.dtype, sparsity: float, device: torch.device,
                   gen: torch.Generator) -> InputSet:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    x = randn(M, K).to(dtype).requires_grad_()
    weight = torch.nn.Parameter((randn(N, K) / math.sqrt(K)).to(dtype))
    keep = torch.rand(N, K, generator=gen, device=device) >= sparsity
    # On the meta device nn.Linear allocates nothing before its weight is replaced by ours.
    pruned = torch.nn.Linear(K, N, bias=False, device="meta")
    pruned.weight = weight
    prune.custom_from_mask(pruned, "weight", keep)
    return InputSet(x=x, weight=weight, keep=keep, bits=pack_mask(keep), dy=randn(M, N).to(dtype), pruned=pruned)


Forward = Callable[[InputSet], torch.Tensor]


def methods(device: torch.device) -> dict[str, Forward]:
    found: dict[str, Forward] = {
        "dense": lambda s: F.linear(s.x, s.weight),
        "wm": lambda s: F.linear(s.x, s.weight * s.keep),
        "prune": lambda s: s.pruned(s.x),
    }
    if device.type == "cuda":
        found["ours_triton"] = lambda s: masked_linear(s.x, s.weight, s.bits, backend="triton")
        if _C.cuda_built():
            found["ours_cuda"] = lambda s: masked_linear(s.x, s.weight, s.bits, backend="cuda")
    else:
        found["ours_cpu"] = lambda s: masked_linear(s.x, s.weight, s.bits)
    return found


def state_bytes(name: str, s: InputSet) -> int:
    """Bytes a method keeps between steps beyond x and W: its mask, and for prune also the
    masked weight its pre-hook left on the module."""
    if name == "dense":
        return 0
    if name == "wm":
        return s.keep.nbytes
    if name == "prune":
        return s.pruned.weight_mask.nbytes + s.pruned.weight.nbytes
    return s.bits.nbytes


def pass_step(forward: Forward, sets: list[InputSet], pass_: str):
    """(setup, step) for one pass; setup (or None) prepares what step(i) needs."""
    if pass_ == "fwd":
        return None, lambda i: forward(sets[i])
    if pass_ == "fwd+bwd":
        def fwd_bwd(i):
            s = sets[i]
            s.clear_grads()
            forward(s).backward(s.dy)
        return None, fwd_bwd
    outputs: list[torch.Tensor] = []

    def setup():
        outputs[:] = [forward(s) for s in sets]

    def bwd(i):
        s = sets[i]
        s.clear_grads()
        outputs[i].backward(s.dy, retain_graph=True)
    return setup, bwd


# ---- correctness guard ---------------------------------------------------------------------------

def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_against_reference(name: str, forward: Forward, s: InputSet) -> dict[str, float]:
    """Relative error norms of y, dX and dW against F.linear(x, W*M) in fp64 (CPU) or fp32 without
    TF32 (CUDA); ends the run with exit status 1 when one is over TOLERANCE, is NaN, or a pruned
    weight gets a nonzero gradient."""
    dtype = s.x.dtype
    ref_dtype = torch.float64 if s.x.device.type == "cpu" else torch.float32
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        xr = s.x.detach().to(ref_dtype).requires_grad_()
        wr = s.weight.detach().to(ref_dtype).requires_grad_()
        yr = F.linear(xr, wr * s.keep)
        yr.backward(s.dy.to(ref_dtype))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    s.clear_grads()
    y = forward(s)
    y.backward(s.dy)
    outputs = {"y": (y, yr), "dx": (s.x.grad, xr.grad), "dw": (s.weight.grad, wr.grad)}
    problems = [f"{k} has shape {tuple(out.shape)} and dtype {out.dtype}, expected {tuple(ref.shape)} and {dtype}"
                for k, (out, ref) in outputs.items() if out.shape != ref.shape or out.dtype != dtype]
    errors = {}
    if not problems:
        errors = {k: rel_err(out, ref) for k, (out, ref) in outputs.items()}
        tol = TOLERANCE[dtype]
        problems += [f"{k} relative error {v:.3g} (limit {tol:g})" for k, v in errors.items() if not v < tol]
        leaked = int((s.weight.grad[~s.keep] != 0).sum())
        if leaked:
            problems.append(f"{leaked} pruned weights have a nonzero gradient")
    s.clear_grads()
    if problems:
        M, K = s.x.shape
        sys.exit(f"CORRECTNESS GUARD FAILED: {LABELS[name]} at {M}x{K}x{s.weight.shape[0]} {dtype}: "
                 + "; ".join(problems) + ". Nothing was written: timings of a wrong kernel are not reported.")
    return errors


# ---- timing --------------------------------------------------------------------------------------

@dataclass
class Timing:
    times: Times
    eager: Optional[Times]  # decode on CUDA: the do_bench times, host launch cost included
    timer: str


def rotation_sets(M: int, K: int, N: int, dtype: torch.dtype, device: torch.device, decode: bool) -> int:
    """How many input sets a step cycles through. Decode steps on CUDA are timed back to back in
    a graph, so the sets together must overflow L2 several times; elsewhere one set: do_bench
    clears L2 before each call, and the CPU's caches are far smaller than any operand."""
    if device.type != "cuda" or not decode:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
    es = torch.finfo(dtype).bits // 8
    set_bytes = (M * K + N * K + 2 * M * N) * es + N * K + 4 * N * math.ceil(K / 32)
    return min(16, 1 + math.ceil(3 * l2 / set_bytes))


def time_step(step, setup, n_sets: int, device: torch.device, graph: bool, quick: bool) -> Timing:
    if device.type == "cpu":
        if setup is not None:
            setup()
        reps = dict(warmup=1, min_reps=3, min_time_s=0.0) if quick else {}
        return Timing(cpu_median_ms(step, n_sets, **reps), None, "perf_counter")
    warmup_ms, rep_ms = (5, 10) if quick else (25, 100)
    if setup is not None:
        setup()
    eager = cuda_events_ms(step, n_sets, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if not graph:
        return Timing(eager, None, "events")
    # Enough calls that one replay lasts about 2 ms even if the device time is the eager time,
    # and every set comes round at least twice.
    calls = n_sets * min(64, max(2, math.ceil(2.0 / (eager.median * n_sets))))
    try:
        times = cuda_graph_ms(step, n_sets, calls, setup=setup, warmup_ms=warmup_ms, rep_ms=rep_ms)
    except RuntimeError as e:
        print(f"WARNING: CUDA graph capture failed ({type(e).__name__}: {e}); "
              "reporting the do_bench time, which includes host launch cost", file=sys.stderr)
        torch.cuda.synchronize()
        return Timing(eager, eager, "events (graph capture failed)")
    return Timing(times, eager, f"graph x{calls}")


def measure_ceilings(device: torch.device, shape: tuple[int, int, int], quick: bool) -> dict:
    """The dense matmul rate (bf16 on CUDA, fp32 on CPU) at ``shape`` and the copy bandwidth
    (bytes read + written) of a large device-to-device copy, each measured once."""
    M, K, N = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(M, K, generator=gen, device=device).to(dtype)
    w = torch.randn(N, K, generator=gen, device=device).to(dtype)
    copy_bytes = (1 << 30 if device.type == "cuda" else 256 << 20) >> (4 if quick else 0)
    src = torch.randint(0, 256, (copy_bytes,), dtype=torch.uint8, generator=gen, device=device)
    dst = torch.empty_like(src)
    with torch.no_grad():
        if device.type == "cuda":
            warmup_ms, rep_ms = (5, 10) if quick else (25, 100)
            matmul_ms = cuda_events_ms(lambda i: F.linear(x, w), 1, warmup_ms=warmup_ms, rep_ms=rep_ms).median
            copy_ms = cuda_events_ms(lambda i: dst.copy_(src), 1, warmup_ms=warmup_ms, rep_ms=rep_ms).median
        else:
            reps = dict(warmup=1, min_reps=3, min_time_s=0.0) if quick else {}
            matmul_ms = cpu_median_ms(lambda i: F.linear(x, w), 1, **reps).median
            copy_ms = cpu_median_ms(lambda i: dst.copy_(src), 1, **reps).median
    return {
        "ceiling_shape": f"{M}x{K}x{N}",
        "ceiling_dtype": str(dtype).removeprefix("torch."),
        "ceiling_tflops": 2 * M * N * K / matmul_ms / 1e9,
        "ceiling_copy_gbps": 2 * copy_bytes / copy_ms / 1e6,
    }


def min_bytes(pass_: str, M: int, K: int, N: int, es: int, mask_bytes: int) -> int:
    """Fewest bytes the masked problem moves: forward reads x, W, bits and writes y; backward
    reads dY, x, W, bits and writes dX, dW. Every method's GB/s uses these same bytes."""
    fwd = (M * K + N * K + M * N) * es + mask_bytes
    bwd = (M * N + 2 * M * K + 2 * N * K) * es + mask_bytes
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ---- one shape -----------------------------------------------------------------------------------

def bench_case(M: int, K: int, N: int, dtype: torch.dtype, sparsity: float, device: torch.device,
               passes: list[str], args, meta: dict) -> list[dict]:
    decode = M <= DECODE_MAX_TOKENS
    n_sets = rotation_sets(M, K, N, dtype, device, decode)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sets = [make_input_set(M, K, N, dtype, sparsity, device, gen) for _ in range(n_sets)]
    found = methods(device)

    errors = {name: check_against_reference(name, f, sets[0]) for name, f in found.items()
              if name not in BASELINES}

    peak = {}
    if device.type == "cuda" and "fwd+bwd" in passes:
        s = sets[0]
        for name, f in found.items():
            s.clear_grads()
            f(s).backward(s.dy)  # warm: autotuning and the allocator's first blocks stay out
            s.clear_grads()
            peak[name] = cuda_peak_bytes(lambda: f(s).backward(s.dy))
            s.clear_grads()

    graph = device.type == "cuda" and decode and not args.no_graphs
    timings: dict[tuple[str, str], Timing] = {}
    for pass_ in passes:
        for name, f in found.items():  # methods interleaved, so drift hits each alike
            setup, step = pass_step(f, sets, pass_)
            timings[name, pass_] = time_step(step, setup, n_sets, device, graph, args.quick)
            for s in sets:
                s.clear_grads()

    configs = None
    if "ours_triton" in found:
        from sparse_engine.kernels.masked_linear import tuned_configs
        configs = {k: str(v) for k, v in tuned_configs().items()}

    es = torch.finfo(dtype).bits // 8
    mask_bytes = sets[0].bits.nbytes
    measured_sparsity = 1 - sets[0].keep.float().mean().item()
    rows = []
    for pass_ in passes:
        flops = FLOPS_PER_MNK[pass_] * M * N * K
        nbytes = min_bytes(pass_, M, K, N, es, mask_bytes)
        for name in found:
            t = timings[name, pass_]
            ms = t.times.median
            tflops = flops / ms / 1e9
            gbps = nbytes / ms / 1e6
            row = {
                **meta, "bench": BENCH, "method": name, "label": LABELS[name],
                "M": M, "K": K, "N": N, "kind": "decode" if decode else "training",
                "dtype": str(dtype).removeprefix("torch."), "sparsity": sparsity,
                "measured_sparsity": measured_sparsity, "pass": pass_,
                "ms": ms, "ms_p20": t.times.p20, "ms_p80": t.times.p80,
                "eager_ms": t.eager.median if t.eager else None, "timer": t.timer, "input_sets": n_sets,
                "tflops": tflops, "pct_of_ceiling_tflops": 100 * tflops / meta["ceiling_tflops"],
                "gbps": gbps, "pct_of_ceiling_copy_gbps": 100 * gbps / meta["ceiling_copy_gbps"],
                "peak_mib_fwd_bwd": peak[name] / 2**20 if pass_ == "fwd+bwd" and name in peak else None,
                "state_mib": state_bytes(name, sets[0]) / 2**20,
                "mask_bits_bytes": mask_bytes,
                "rel_err": errors.get(name),
                "triton_configs": configs if name == "ours_triton" else None,
            }
            for b in BASELINES:
                row[f"speedup_vs_{b}"] = timings[b, pass_].times.median / ms
            rows.append(row)
    return rows


# ---- reporting -----------------------------------------------------------------------------------

def fmt(v, spec) -> Optional[str]:
    return None if v is None else format(v, spec)


COLUMNS = [
    ("shape MxKxN", lambda r: f"{r['M']}x{r['K']}x{r['N']}"),
    ("kind", lambda r: r["kind"]),
    ("dtype", lambda r: r["dtype"]),
    ("sparsity", lambda r: f"{r['sparsity']:g}"),
    ("pass", lambda r: r["pass"]),
    ("method", lambda r: r["label"]),
    ("ms", lambda r: f"{r['ms']:.4g}"),
    ("spread %", lambda r: f"{100 * (r['ms_p80'] - r['ms_p20']) / r['ms']:.1f}"),
    ("eager ms", lambda r: fmt(r["eager_ms"], ".4g")),
    ("TFLOP/s", lambda r: f"{r['tflops']:.3g}"),
    ("% ceiling TFLOP/s", lambda r: f"{r['pct_of_ceiling_tflops']:.1f}"),
    ("GB/s", lambda r: f"{r['gbps']:.4g}"),
    ("% copy GB/s", lambda r: f"{r['pct_of_ceiling_copy_gbps']:.1f}"),
    ("speedup vs F.linear dense", lambda r: f"{r['speedup_vs_dense']:.3f}"),
    ("speedup vs F.linear(x, W*M)", lambda r: f"{r['speedup_vs_wm']:.3f}"),
    ("speedup vs nn.utils.prune", lambda r: f"{r['speedup_vs_prune']:.3f}"),
    ("peak MiB fwd+bwd", lambda r: fmt(r["peak_mib_fwd_bwd"], ".1f")),
    ("state MiB", lambda r: f"{r['state_mib']:.2f}"),
    ("timer", lambda r: r["timer"]),
]


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets against this run's numbers, one line per case: 'met' or 'NOT met'."""
    by = {(r["M"], r["K"], r["N"], r["dtype"], r["sparsity"], r["pass"], r["method"]): r for r in rows}
    ours = [m for m in LABELS if m.startswith("ours_") and any(r["method"] == m for r in rows)]
    lines = []

    def line(ok: bool, text: str, r: dict):
        lines.append(f"{'met    ' if ok else 'NOT met'}  {text}   {r['M']}x{r['K']}x{r['N']} {r['dtype']} "
                     f"sparsity {r['sparsity']:g}")

    for (M, K, N, dtype, sparsity, pass_, method), r in by.items():
        if method not in ours:
            continue
        dense = by[M, K, N, dtype, sparsity, pass_, "dense"]
        wm = by[M, K, N, dtype, sparsity, pass_, "wm"]
        label = LABELS[method]
        if r["kind"] == "training" and pass_ == "fwd+bwd":
            ratio = r["ms"] / dense["ms"]
            line(ratio <= TARGET_FWDBWD_OVER_DENSE,
                 f"fwd+bwd {label} ms / F.linear dense ms = {ratio:.3f} (target <= {TARGET_FWDBWD_OVER_DENSE})", r)
            speedup = wm["ms"] / r["ms"]
            line(speedup >= TARGET_SPEEDUP_VS_WM_TRAIN,
                 f"fwd+bwd F.linear(x, W*M) ms / {label} ms = {speedup:.3f} "
                 f"(target >= {TARGET_SPEEDUP_VS_WM_TRAIN})", r)
        if r["kind"] == "decode" and pass_ == "fwd":
            speedup = wm["ms"] / r["ms"]
            line(speedup >= TARGET_SPEEDUP_VS_WM_DECODE,
                 f"fwd F.linear(x, W*M) ms / {label} ms = {speedup:.3f} "
                 f"(target >= {TARGET_SPEEDUP_VS_WM_DECODE})", r)
    for K, N, mask_bytes in sorted({(r["K"], r["N"], r["mask_bits_bytes"]) for r in rows if r["method"] in ours}):
        per_mask = 2 * N * K / mask_bytes
        lines.append(f"{'met    ' if per_mask >= TARGET_BF16_WEIGHT_PER_MASK else 'NOT met'}  mask bits "
                     f"{mask_bytes / 2**20:.3f} MiB = 1/{per_mask:.2f} of the bf16 weight "
                     f"({2 * N * K / 2**20:.2f} MiB) (target 1/{TARGET_BF16_WEIGHT_PER_MASK})   weight {N}x{K}")
    return lines


def timer_note(meta: dict) -> str:
    if meta["device_type"] == "cpu":
        return "time.perf_counter around each call"
    events = "`triton.testing.do_bench` (CUDA events around each call, L2 cleared before it)"
    if not meta["cuda_graphs_for_decode"]:
        return f"{events}, decode shapes too (--no-graphs): host launch cost shows in their times"
    return (f"training shapes: {events}; decode shapes (<= {DECODE_MAX_TOKENS} tokens): a CUDA graph of "
            "back-to-back calls rotating over input sets that together overflow L2, so neither host launch cost "
            "nor cached weights are measured (timer `graph xN`); eager ms: do_bench on the same calls, where host "
            "launch cost shows once it exceeds the time of the L2 clear")


def markdown(rows: list[dict], meta: dict, targets: list[str], command: str) -> str:
    cuda = meta["device_type"] == "cuda"
    return "\n".join([
        f"# masked_linear benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, git {meta['git_sha']}, torch {meta['torch']}, triton {meta['triton']}"
        + (f", CUDA {meta['cuda']}" if cuda else f", {meta['cpu_threads']} CPU threads"),
        f"- command: `{command}`",
        f"- ceilings, measured once before the table: dense F.linear {meta['ceiling_dtype']} forward at "
        f"{meta['ceiling_shape']} = {meta['ceiling_tflops']:.4g} TFLOP/s (the dense forward row of that shape "
        f"and dtype, if in the table, measures it again: their gap is run-to-run noise); "
        f"copy {meta['ceiling_copy_gbps']:.4g} GB/s (bytes read + written)",
        f"- ms: median after warm-up; {timer_note(meta)}",
        "- TFLOP/s counts dense work: 2MNK forward, 4MNK backward, 6MNK both; GB/s counts the fewest bytes of "
        "the masked problem (x, W, mask bits, y; dY, x, W, bits, dX, dW), the same for every method",
        "- spread % = (80th - 20th percentile) / median of the timed calls; a speedup nearer 1 than the "
        "spreads of its two rows is noise",
        "- speedup vs B = B's ms / this row's ms, same shape, dtype and pass (> 1: this row is faster)",
        "- peak MiB fwd+bwd: peak allocation of one forward+backward beyond its inputs ("
        + ("torch.cuda.max_memory_allocated" if cuda else "n/a on CPU") + "); state MiB: what the method keeps "
        "between steps beyond x and W (mask; for prune also the masked weight left on the module)",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "## Targets (measured in this run)",
        "",
        *(f"- {t}" for t in targets),
        "",
    ])


# ---- command line --------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        M, K, N = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxKxN (tokens x in x out), got {text!r}")
    if min(M, K, N) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return M, K, N


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                   help="default: bf16 fp16 on CUDA, fp32 on CPU")
    p.add_argument("--shapes", nargs="+", type=parse_shape, metavar="MxKxN",
                   help="default: tokens 8192 (CPU 256) and 1, 16, 64 with the weights "
                        f"{CUDA_WEIGHTS} (CPU {CPU_WEIGHTS}) as (K, N)")
    p.add_argument("--sparsity", nargs="+", type=float, default=[0.5], help="fractions of weights pruned")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--ceiling-shape", type=parse_shape, metavar="MxKxN",
                   help="shape of the dense matmul ceiling (default: the benchmarked shape with most flops)")
    p.add_argument("--out-dir", type=Path,
                   help="default: bench/results (with --quick, a fresh temporary directory)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: the smoke test")
    p.add_argument("--no-graphs", action="store_true", help="time decode shapes with do_bench instead of CUDA graphs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if any(not 0 <= s < 1 for s in args.sparsity):
        p.error(f"--sparsity: expected fractions in [0, 1), got {args.sparsity}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    shapes = args.shapes or DEFAULT_SHAPES["quick" if args.quick else args.device]
    dtypes = [DTYPES[d] for d in (args.dtypes or (["bf16", "fp16"] if device.type == "cuda" else ["fp32"]))]
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    command = command_line("bench_masked_linear.py", argv)

    meta = run_metadata(device)
    meta["sparse_engine"] = sparse_engine.__version__
    meta["quick"] = args.quick
    meta["cuda_graphs_for_decode"] = device.type == "cuda" and not args.no_graphs
    ceiling_shape = args.ceiling_shape or max(shapes, key=lambda s: s[0] * s[1] * s[2])
    meta.update(measure_ceilings(device, ceiling_shape, args.quick))
    print(f"{meta['device']}: dense {meta['ceiling_dtype']} matmul {meta['ceiling_tflops']:.4g} TFLOP/s at "
          f"{meta['ceiling_shape']}, copy {meta['ceiling_copy_gbps']:.4g} GB/s", flush=True)

    rows = []
    for M, K, N in shapes:
        for dtype in dtypes:
            for sparsity in args.sparsity:
                print(f"{M}x{K}x{N} {str(dtype).removeprefix('torch.')} sparsity {sparsity:g}", flush=True)
                rows += bench_case(M, K, N, dtype, sparsity, device, args.passes, args, meta)
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    targets = target_lines(rows)
    name = f"{BENCH}_{device_slug(device)}"
    write_results(out_dir, name, rows, markdown(rows, meta, targets, command))


if __name__ == "__main__":
    main()
