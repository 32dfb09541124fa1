"""Benchmark of topk_mask (one global threshold over many score tensors) against what users run today.

Workload: about 100 score tensors shaped like a 12-layer transformer (per layer q, k, v, o: d x d,
MLP up 4d x d and down d x 4d, two norm vectors of d; then a token embedding V x d and a final norm),
d and V chosen so the scores total 1e6, 1e8 and 1e9 on CUDA (1e6 and 1e7 on the CPU); scores are
|W| of weights drawn like an initialised model (normal, std 1/sqrt(fan_in)); k keeps the largest
(1 - sparsity) of all scores. One mask is wanted per tensor.

Methods, each timed in the same run on the same inputs, everything a user's call does included:
  kthvalue  thr = kthvalue(torch.cat([s.flatten() ...]), n - k); masks [s > thr for s in scores]
  topk      idx = topk(cat, k, sorted=False).indices; scatter into a bool mask of n; split into views
  sort      thr = sort(cat).values[n - k - 1]; masks [s > thr for s in scores]
  ours_*    sparse_engine topk_mask(scores, k): backend triton, and cuda when the C++ CUDA kernels
            are built; on CPU the one CPU kernel. Its masks are bit-packed (n/8 bytes), the
            baselines' bool (n bytes): each method returns what its users keep.
A baseline that runs out of memory is reported as OOM, not dropped.

Before a case is timed, two guards end the run (exit status 1, nothing written) on any mismatch:
  tie-free  on tie-free scores of the same layer shapes (distinct values; for fp16/bf16, which
            have ~65k finite values, a smaller mix of the same shapes), every baseline's mask,
            packed with pack_mask, and each of ours must be bit-identical with exactly k bits set;
  rule      on the timed scores themselves (with ties in bf16), each of ours must equal the
            contract's rule: every score above the k-th largest kept, ties at it kept in (tensor,
            flat index) order until k.

  python bench/bench_topk_mask.py                                   # CUDA: 1e6 1e8 1e9, fp32 + bf16
  python bench/bench_topk_mask.py --device cpu                      # CPU: 1e6 1e7
  python bench/bench_topk_mask.py --device cpu --sizes 1e6 1e7 1e8  # CPU with 1e8
  python bench/bench_topk_mask.py --device cpu --quick --out-dir /tmp/t  # smoke test

Results: one JSON line per (size, dtype, sparsity, method) appended to
<out-dir>/topk_mask_<device>.jsonl, and the run's table rewritten to <out-dir>/topk_mask_<device>.md.
"""
import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from record import command_line, device_slug, markdown_table, results_dir, run_metadata, write_results
from timing import Times, copy_gbps, cpu_peak_bytes, cuda_peak_bytes, device_median_ms

import sparse_engine
from sparse_engine import _C, pack_mask
from sparse_engine.ops.topk_mask import selection_shape, topk_mask

BENCH = "topk_mask"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYERS = 12
DEFAULT_SIZES = {"cuda": (10**6, 10**8, 10**9), "cpu": (10**6, 10**7), "quick": (10**4, 10**5)}
LABELS = {
    "kthvalue": "cat + kthvalue",
    "topk": "cat + topk + scatter",
    "sort": "cat + sort",
    "ours_triton": "topk_mask[triton]",
    "ours_cuda": "topk_mask[cuda]",
    "ours_cpu": "topk_mask[cpu]",
}
BASELINES = ("kthvalue", "topk", "sort")

# Targets of the issue, checked on the measured numbers of this run.
TARGET_GPU_SIZE = 10**9
TARGET_GPU_READS = 2.0        # ours ms / ms of one read of the fp32 scores at the copy bandwidth
TARGET_GPU_SPEEDUP = 10.0     # best baseline ms / ours ms, fp32
TARGET_CPU_SIZE = 10**7
TARGET_CPU_SPEEDUP = 3.0      # best baseline ms / ours ms, on 2 cores
TARGET_TEMP_FRACTION = 0.01   # temporaries beyond the masks / bytes of the scores, largest size
TEMP_FLOOR = 1 << 20          # below 1 MiB a temporary cannot be O(n) at the sizes measured

Masks = list[torch.Tensor]
Method = Callable[[list[torch.Tensor], int], Masks]


# ---- workload ------------------------------------------------------------------------------------

def layer_shapes(n: int) -> list[tuple[int, ...]]:
    """About 100 shapes of a transformer-like model totalling about ``n`` elements (at most d short):
    12 layers of 12 d^2 + 2 d, an embedding of V x d with V near 8 d, and a final norm."""
    d = max(1, math.isqrt(n // (12 * LAYERS + 8)))
    per_layer = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (d,), (d,)]
    rest = n - LAYERS * (12 * d * d + 2 * d) - d
    vocab = max(1, rest // d)
    return per_layer * LAYERS + [(vocab, d), (d,)]


def make_scores(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                gen: torch.Generator) -> list[torch.Tensor]:
    """|W| of weights like an initialised model's: normal with std 1/sqrt(fan_in), norms near 1."""
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen, device=device)
        if len(shape) == 1:
            w.mul_(0.02).add_(1.0)
        else:
            w.mul_(1 / math.sqrt(shape[1]))
        out.append(w.abs_().to(dtype))
    return out


def tie_free_scores(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                    seed: int) -> list[torch.Tensor]:
    """Scores of the given shapes that are all distinct (no ties, no -0.0), of either sign.

    float32: a bijective hash of the global flat index onto [0, 2^31), mapped onto the bit
    patterns of the finite floats with |x| >= 1 (up to 2^31 scores, computed one tensor at a time).
    float16/bfloat16: a random choice among all their finite values but -0.0 (about 63k-65k).
    """
    sizes = [math.prod(s) for s in shapes]
    n = sum(sizes)
    if dtype == torch.float32:
        if n > 1 << 31:
            raise ValueError(f"tie_free_scores: at most 2^31 float32 scores, got {n}")
        m31 = (1 << 31) - 1
        a, b = (0x2545F491 + 2 * seed) & m31 | 1, 0x6C8E9CF5
        out, offset = [], 0
        for shape, size in zip(shapes, sizes):
            h = torch.arange(offset, offset + size, device=device, dtype=torch.int64)
            h.mul_(a).bitwise_and_(m31)
            h.bitwise_xor_(h >> 16).mul_(b).bitwise_and_(m31)
            h.bitwise_xor_(h >> 13)
            bits = 0x3F800000 + (h & ((1 << 30) - 1))  # 1.0 up to the largest finite float
            bits = torch.where(h >= 1 << 30, bits - (1 << 31), bits)  # sign bit set, as int32
            out.append(bits.to(torch.int32).view(torch.float32).reshape(shape))
            offset += size
        return out
    inf_bits = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[dtype]
    positive = torch.arange(inf_bits, dtype=torch.int32)
    values = torch.cat([positive, positive[1:] - 0x8000]).to(torch.int16)  # no 0x8000 (-0.0)
    if n > values.numel():
        raise ValueError(f"tie_free_scores: {dtype} has {values.numel()} distinct finite values, asked for {n}")
    pick = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(seed))[:n]]
    return [p.view(dtype).reshape(shape).to(device) for p, shape in zip(pick.split(sizes), shapes)]


def tie_free_shapes(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[tuple[int, ...]]:
    """The shapes of the tie-free guard: the timed ones, or for fp16/bf16 beyond their count of
    distinct values, the same mix scaled down."""
    if dtype == torch.float32 or sum(math.prod(s) for s in shapes) <= 60_000:
        return shapes
    return layer_shapes(60_000)


def rotation_sets(set_bytes: int, device: torch.device) -> int:
    """How many input sets a timed step cycles through. On CUDA one: do_bench clears L2 before
    every call. On the CPU enough that together they overflow the last-level cache twice."""
    if device.type == "cuda":
        return 1
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        cache = int(text[:-1]) << {"K": 10, "M": 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        cache = 32 << 20
    return max(1, min(8, math.ceil(2 * cache / set_bytes)))


# ---- methods -------------------------------------------------------------------------------------

def _cat(scores: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.reshape(-1) for s in scores])


def by_kthvalue(scores: list[torch.Tensor], k: int) -> Masks:
    flat = _cat(scores)
    thr = torch.kthvalue(flat, flat.numel() - k).values  # the (n-k)-th smallest: k scores lie above it
    return [s > thr for s in scores]


def by_topk(scores: list[torch.Tensor], k: int) -> Masks:
    flat = _cat(scores)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    return [m.view(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def by_sort(scores: list[torch.Tensor], k: int) -> Masks:
    flat = _cat(scores)
    thr = torch.sort(flat).values[flat.numel() - k - 1]
    return [s > thr for s in scores]


def methods(device: torch.device) -> dict[str, Method]:
    found: dict[str, Method] = {"kthvalue": by_kthvalue, "topk": by_topk, "sort": by_sort}
    if device.type == "cuda":
        found["ours_triton"] = lambda scores, k: topk_mask(scores, k, backend="triton")
        if _C.cuda_built():
            found["ours_cuda"] = lambda scores, k: topk_mask(scores, k, backend="cuda")
    else:
        found["ours_cpu"] = lambda scores, k: topk_mask(scores, k)
    return found


def run_baseline(fn: Callable[[], object], device: torch.device) -> Optional[str]:
    """Runs ``fn``; returns None, or 'OOM' / 'error: ...' when a baseline cannot run this size."""
    try:
        fn()
    except (torch.OutOfMemoryError, MemoryError):
        status = "OOM"
    except RuntimeError as e:  # the CPU allocator raises a plain RuntimeError
        status = "OOM" if "alloc" in str(e) or "out of memory" in str(e) else f"error: {str(e).splitlines()[0]}"
    else:
        return None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return status


# ---- correctness guards --------------------------------------------------------------------------

_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def packed(masks: Masks, scores: list[torch.Tensor]) -> Masks:
    """Bool masks packed per the contract: rank >= 2 viewed as (shape[0], rest), rank <= 1 as (1, n)."""
    return [pack_mask(m.reshape(selection_shape(s.shape))) for m, s in zip(masks, scores)]


def rule_masks(scores: list[torch.Tensor], k: int) -> Masks:
    """The contract's masks (largest) in plain torch, ties included: every score above the k-th
    largest, then scores equal to it in (tensor, flat index) order until k are kept."""
    flat = _cat(scores)
    thr = torch.kthvalue(flat, flat.numel() - k + 1).values
    del flat
    keep = [s > thr for s in scores]
    need = k - sum(int(m.sum()) for m in keep)
    for m, s in zip(keep, scores):
        if need <= 0:
            break
        ties = (s == thr).reshape(-1).nonzero().squeeze(1)[:need]
        m.view(-1)[ties] = True
        need -= ties.numel()
    return keep


def mask_problems(masks, ref: Masks, k: int, scores: list[torch.Tensor]) -> list[str]:
    """How packed ``masks`` differ from the packed reference ``ref`` (empty if bit-identical)."""
    if not isinstance(masks, (list, tuple)) or len(masks) != len(scores):
        return [f"expected a list of {len(scores)} masks, got {type(masks).__name__} "
                f"of {len(masks) if isinstance(masks, (list, tuple)) else '?'}"]
    problems = []
    for i, (m, r) in enumerate(zip(masks, ref)):
        if m.dtype != torch.int32 or m.shape != r.shape:
            problems.append(f"mask {i} is {m.dtype} {tuple(m.shape)}, expected int32 {tuple(r.shape)}")
    if problems:
        return problems[:3]
    bits = sum(int(_POPCOUNT.to(m.device)[m.view(torch.uint8).long()].sum()) for m in masks)
    if bits != k:
        problems.append(f"{bits} bits set, expected k = {k}")
    wrong = [(i, int((m != r).sum())) for i, (m, r) in enumerate(zip(masks, ref))]
    wrong = [(i, w) for i, w in wrong if w]
    if wrong:
        problems.append(f"{len(wrong)} of {len(scores)} masks differ (first: mask {wrong[0][0]} of shape "
                        f"{tuple(scores[wrong[0][0]].shape)}, {wrong[0][1]} words)")
    return problems


def fail(what: str, dtype: torch.dtype, n: int, problems: list[str]) -> None:
    sys.exit(f"CORRECTNESS GUARD FAILED ({what}) at n={n} {dtype}: " + "; ".join(problems)
             + ". Nothing was written: timings of a wrong kernel are not reported.")


def check_tie_free(found: dict[str, Method], shapes: list[tuple[int, ...]], dtype: torch.dtype,
                   sparsity: float, device: torch.device, seed: int) -> dict[str, str]:
    """Every baseline's packed mask and each of ours, bit-identical on tie-free scores with exactly
    k bits; ends the run otherwise. Returns the baselines that could not run (name -> status)."""
    scores = tie_free_scores(tie_free_shapes(shapes, dtype), dtype, device, seed)
    n = sum(s.numel() for s in scores)
    k = keep_count(n, sparsity)
    ref, ref_name, skipped = None, None, {}
    for name in BASELINES:
        out = []
        status = run_baseline(lambda: out.append(found[name](scores, k)), device)
        if status:
            skipped[name] = status
            continue
        bits = packed(out.pop(), scores)
        if ref is None:
            ref, ref_name = bits, name
            problems = mask_problems(bits, bits, k, scores)
        else:
            problems = mask_problems(bits, ref, k, scores)
        if problems:
            fail(f"tie-free: baseline {LABELS[name]} against {LABELS[ref_name]}", dtype, n, problems)
        del bits
    if ref is None:
        ref = packed(rule_masks(scores, k), scores)  # every baseline ran out of memory
    for name, f in found.items():
        if name not in BASELINES:
            problems = mask_problems(f(scores, k), ref, k, scores)
            if problems:
                fail(f"tie-free: {LABELS[name]} against {LABELS.get(ref_name, 'the rule')}", dtype, n, problems)
    return skipped


def check_rule(found: dict[str, Method], scores: list[torch.Tensor], k: int) -> None:
    """Each of ours equals the contract's rule on the timed scores (ties included)."""
    ref = packed(rule_masks(scores, k), scores)
    for name, f in found.items():
        if name not in BASELINES:
            problems = mask_problems(f(scores, k), ref, k, scores)
            if problems:
                fail(f"rule, timed scores: {LABELS[name]}", scores[0].dtype, sum(s.numel() for s in scores),
                     problems)


# ---- one case ------------------------------------------------------------------------------------

def keep_count(n: int, sparsity: float) -> int:
    return min(n - 1, max(1, round((1 - sparsity) * n)))


def mask_bytes(name: str, scores: list[torch.Tensor]) -> int:
    """Bytes of the masks a method returns: packed int32 words for ours, one bool a score else."""
    if name in BASELINES:
        return sum(s.numel() for s in scores)
    return sum(4 * r * math.ceil(c / 32) for r, c in (selection_shape(s.shape) for s in scores))


def bench_case(size: int, dtype: torch.dtype, sparsity: float, device: torch.device, args, meta: dict) -> list[dict]:
    shapes = layer_shapes(size)
    n = sum(math.prod(s) for s in shapes)
    k = keep_count(n, sparsity)
    found = methods(device)
    status = check_tie_free(found, shapes, dtype, sparsity, device, args.seed)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    score_bytes = n * torch.finfo(dtype).bits // 8
    n_sets = 1 if args.quick else rotation_sets(score_bytes, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    sets = [make_scores(shapes, dtype, device, gen) for _ in range(n_sets)]
    check_rule(found, sets[0], k)

    peak: dict[str, Optional[int]] = {}
    times: dict[str, Times] = {}
    for name, f in found.items():  # the methods one after the other, each on every set
        if name in status:
            continue

        def measure():
            peak[name] = (cuda_peak_bytes if device.type == "cuda" else cpu_peak_bytes)(lambda: f(sets[0], k))
            times[name] = device_median_ms(lambda i: f(sets[i], k), n_sets, device, quick=args.quick)

        if name in BASELINES:  # warm (finds OOM cheaply), then measure
            problem = run_baseline(lambda: f(sets[0], k), device) or run_baseline(measure, device)
            if problem:
                status[name] = problem
                peak.pop(name, None), times.pop(name, None)
        else:
            f(sets[0], k)  # warm: autotuning, thread pools, first-touch buffers
            measure()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    read_ms = score_bytes / (meta["copy_gbps"] * 1e6)
    ok_baselines = [b for b in BASELINES if b in times]
    best = min(ok_baselines, key=lambda b: times[b].median) if ok_baselines else None
    rows = []
    for name in found:
        t = times.get(name)
        row = {
            **meta, "bench": BENCH, "method": name, "label": LABELS[name], "status": status.get(name, "ok"),
            "size": size, "n": n, "tensors": len(shapes), "d": shapes[0][0], "dtype": str(dtype).removeprefix("torch."),
            "sparsity": sparsity, "k": k, "score_bytes": score_bytes, "input_sets": n_sets,
            "ms": t.median if t else None, "ms_p20": t.p20 if t else None, "ms_p80": t.p80 if t else None,
            "gbps": score_bytes / t.median / 1e6 if t else None,
            "reads": t.median / read_ms if t else None,
            "mask_bytes": mask_bytes(name, sets[0]),
            "peak_bytes": peak.get(name),
            "peak_method": "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM - VmRSS",
            "best_baseline": best,
        }
        for b in BASELINES:
            row[f"speedup_vs_{b}"] = times[b].median / t.median if t and b in times else None
        row["speedup_vs_best"] = times[best].median / t.median if t and best else None
        rows.append(row)
    return rows


# ---- reporting -----------------------------------------------------------------------------------

def fmt(v, spec) -> Optional[str]:
    return None if v is None else format(v, spec)


def mib(v) -> Optional[str]:
    return None if v is None else f"{v / 2**20:.2f}"


def temporaries(r: dict) -> Optional[int]:
    return None if r["peak_bytes"] is None else r["peak_bytes"] - r["mask_bytes"]


COLUMNS = [
    ("size", lambda r: f"{r['size']:.0e}".replace("e+0", "e")),
    ("n", lambda r: str(r["n"])),
    ("dtype", lambda r: r["dtype"]),
    ("sparsity", lambda r: f"{r['sparsity']:g}"),
    ("method", lambda r: r["label"]),
    ("ms", lambda r: fmt(r["ms"], ".4g") or r["status"]),
    ("spread %", lambda r: None if r["ms"] is None else f"{100 * (r['ms_p80'] - r['ms_p20']) / r['ms']:.1f}"),
    ("GB/s", lambda r: fmt(r["gbps"], ".4g")),
    ("reads", lambda r: fmt(r["reads"], ".3g")),
    ("peak MiB", lambda r: mib(r["peak_bytes"])),
    ("masks MiB", lambda r: mib(r["mask_bytes"])),
    ("temporaries MiB", lambda r: mib(temporaries(r))),
    *((f"speedup vs {LABELS[b]}", (lambda b: lambda r: fmt(r[f"speedup_vs_{b}"], ".3g"))(b)) for b in BASELINES),
]


def target_lines(rows: list[dict], device: torch.device) -> list[str]:
    """The issue's targets against this run's numbers, one line per case: 'met' or 'NOT met'."""
    ours = [r for r in rows if r["method"] not in BASELINES]
    lines = []

    def line(ok: bool, text: str):
        lines.append(f"{'met    ' if ok else 'NOT met'}  {text}")

    def case(r):
        return f"n={r['n']} {r['dtype']} sparsity {r['sparsity']:g}"

    def vs_best(r, target):
        if r["best_baseline"] is None:
            lines.append(f"n/a      no baseline ran (OOM or error); {r['label']} ran in {r['ms']:.4g} ms   {case(r)}")
            return
        line(r["speedup_vs_best"] >= target, f"best baseline ({LABELS[r['best_baseline']]}) ms / {r['label']} ms = "
             f"{r['speedup_vs_best']:.3g} (target >= {target:g})   {case(r)}")

    if device.type == "cuda":
        big = [r for r in ours if r["size"] == TARGET_GPU_SIZE and r["dtype"] == "float32"]
        if not big:
            lines.append(f"n/a      GPU targets are at {TARGET_GPU_SIZE:.0e} fp32 scores: not measured in this run")
        for r in big:
            line(r["reads"] <= TARGET_GPU_READS, f"{r['label']} ms / one read of the scores at copy bandwidth = "
                 f"{r['reads']:.3g} (target <= {TARGET_GPU_READS:g})   {case(r)}")
            vs_best(r, TARGET_GPU_SPEEDUP)
    else:
        at = [r for r in ours if r["size"] == TARGET_CPU_SIZE]
        if not at:
            lines.append(f"n/a      the CPU target is at {TARGET_CPU_SIZE:.0e} scores: not measured in this run")
        for r in at:
            vs_best(r, TARGET_CPU_SPEEDUP)
        threads = rows[0]["cpu_threads"] if rows else None
        if at and threads != 2:
            lines.append(f"note     the CPU target is for 2 cores; this run used {threads} threads")
    for method, dtype in dict.fromkeys((r["method"], r["dtype"]) for r in ours):
        mine = sorted((r for r in ours if (r["method"], r["dtype"]) == (method, dtype) and r["peak_bytes"] is not None),
                      key=lambda r: r["n"])
        if not mine:
            continue
        top = mine[-1]
        allowed = max(TEMP_FLOOR, TARGET_TEMP_FRACTION * top["score_bytes"])
        growth = ", ".join(f"{temporaries(r) / 2**20:.2f} at n={r['n']} s={r['sparsity']:g}" for r in mine)
        worst = max(temporaries(r) for r in mine if r["n"] == top["n"])
        line(worst <= allowed, f"{top['label']} {dtype} temporaries beyond the masks (MiB): {growth}; at the largest n "
             f"{worst / 2**20:.2f} MiB = {100 * worst / top['score_bytes']:.2f}% of the scores' bytes "
             f"(target <= {allowed / 2**20:.2f} MiB: "
             f"{100 * TARGET_TEMP_FRACTION:g}% or 1 MiB, no O(n) temporary)")
    return lines


def markdown(rows: list[dict], meta: dict, targets: list[str], command: str) -> str:
    cuda = meta["device_type"] == "cuda"
    memory = ("torch.cuda.max_memory_allocated during one call beyond what was allocated before it (inputs "
              "excluded, returned masks included)" if cuda else
              "the process's peak resident set during one call (VmHWM, reset before it, after malloc_trim) beyond "
              "its resident set before it, to the 4 KiB page: torch's tensors and the kernel's own buffers alike "
              "(returned masks included)")
    return "\n".join([
        f"# topk_mask benchmark: {meta['device']}",
        "",
        f"- date {meta['date']}, git {meta['git_sha']}, torch {meta['torch']}, triton {meta['triton']}"
        + (f", CUDA {meta['cuda']}" if cuda else f", {meta['cpu_threads']} CPU threads"),
        f"- command: `{command}`",
        *([] if cuda else [f"- host load average (1 min) at the start: {meta['load_avg_1min']:.2f} on "
                           f"{meta['cpu_count']} CPUs (a load near or above the CPU count means other processes "
                           "competed for the cores: read the spreads)"]),
        f"- ceiling, measured once before the table: copy {meta['copy_gbps']:.4g} GB/s (bytes read + written, "
        f"{meta['copy_bytes'] / 2**20:.0f} MiB copied)",
        f"- workload: {LAYERS}-layer transformer-like mix of {rows[0]['tensors'] if rows else '?'} score tensors "
        "(d x d, 4d x d, d x 4d, vectors of d, an embedding V x d); scores |W|, W normal with std "
        "1/sqrt(fan_in); keep the largest (1 - sparsity) n",
        "- ms: median after warm-up; " + ("`triton.testing.do_bench` (CUDA events around each call, L2 cleared "
                                          "before it)" if cuda else "time.perf_counter around each call, "
                                          "rotating over input sets that together overflow the last-level cache"),
        "- every method's time includes all a user's call does: concatenation, selection and masks (bool for "
        "the baselines, bit-packed for topk_mask); OOM: the baseline ran out of memory at that size",
        "- GB/s = bytes of the scores (read once) / time; reads = time / (bytes of the scores / copy GB/s)",
        "- spread % = (80th - 20th percentile) / median of the timed calls; a speedup nearer 1 than the "
        "spreads of its rows is noise" + ("" if cuda else "; the CPU cores may be shared with other work"),
        f"- peak MiB: {memory}; temporaries = peak - masks",
        "- speedup vs B = B's ms / this row's ms, same case (> 1: this row is faster)",
        "- correctness, checked before timing: masks bit-identical to every baseline's (packed) on tie-free "
        "scores with exactly k kept, and to the contract's tie rule on the timed scores",
        "",
        markdown_table(rows, COLUMNS),
        "",
        "## Targets (measured in this run)",
        "",
        *(f"- {t}" for t in targets),
        "",
    ])


# ---- command line --------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of scores such as 1e7, got {text!r}")
    if not value.is_integer() or value < 1000:
        raise argparse.ArgumentTypeError(f"expected a whole number of scores >= 1000, got {text!r}")
    return int(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", nargs="+", type=parse_size, metavar="N",
                   help=f"total scores (default: {' '.join(f'{s:.0e}' for s in DEFAULT_SIZES['cuda'])} on CUDA, "
                        f"{' '.join(f'{s:.0e}' for s in DEFAULT_SIZES['cpu'])} on CPU)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--sparsity", nargs="+", type=float, help="fractions of scores pruned (default: 0.5 0.9; "
                                                            "with --quick 0.5)")
    p.add_argument("--out-dir", type=Path, help="default: bench/results (with --quick, a fresh temporary directory)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: the smoke test")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's). Where "
                   "other processes hold the cores, each parallel region of a multi-threaded call waits for its "
                   "descheduled threads: compare with --threads 1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive count, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.sparsity = args.sparsity or ([0.5] if args.quick else [0.5, 0.9])
    if any(not 0 < s < 1 for s in args.sparsity):
        p.error(f"--sparsity: expected fractions in (0, 1), got {args.sparsity}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = args.sizes or DEFAULT_SIZES["quick" if args.quick else args.device]
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    command = command_line("bench_topk_mask.py", argv)

    meta = run_metadata(device)
    meta["sparse_engine"] = sparse_engine.__version__
    meta["quick"] = args.quick
    meta["load_avg_1min"] = os.getloadavg()[0]  # other work on the machine: CPU timings are only as good as this
    meta["cpu_count"] = os.cpu_count()
    meta["copy_bytes"] = (1 << 30 if device.type == "cuda" else 256 << 20) >> (4 if args.quick else 0)
    meta["copy_gbps"] = copy_gbps(device, meta["copy_bytes"], quick=args.quick)
    print(f"{meta['device']}: copy {meta['copy_gbps']:.4g} GB/s (read + written)", flush=True)

    rows = []
    for size in sizes:
        for dtype_name in args.dtypes:
            for sparsity in args.sparsity:
                print(f"{size:.0e} scores {dtype_name} sparsity {sparsity:g}", flush=True)
                rows += bench_case(size, DTYPES[dtype_name], sparsity, device, args, meta)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    targets = target_lines(rows, device)
    name = f"{BENCH}_{device_slug(device)}"
    write_results(out_dir, name, rows, markdown(rows, meta, targets, command))


if __name__ == "__main__":
    main()
