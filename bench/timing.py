"""Timers shared by the benchmarks in bench/: the median time of one step after warm-up.

A step is a callable ``step(i)`` that runs the measured work on input set ``i`` of ``n_sets``;
the timers cycle ``i`` so that consecutive calls read different memory (rotation keeps the L2
cache from serving weights that a real model would have to read from HBM).

CUDA work is timed on the device (events or graph replays), never by a host clock around
asynchronous launches; CPU work by ``time.perf_counter``.
"""
import ctypes
import gc
import itertools
import re
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

Step = Callable[[int], object]
QUANTILES = (0.5, 0.2, 0.8)


class Times(NamedTuple):
    """Milliseconds per step: the median, and the 20th and 80th percentiles (their spread is the
    noise against which a difference between two methods must be read)."""
    median: float
    p20: float
    p80: float

    def scaled(self, factor: float) -> "Times":
        return Times(*(v * factor for v in self))


def cuda_events_ms(step: Step, n_sets: int, *, warmup_ms: float = 25, rep_ms: float = 100) -> Times:
    """Milliseconds of one ``step`` through ``triton.testing.do_bench``.

    do_bench records a pair of events around every call and clears a 256 MB buffer before each,
    so no call finds its operands in L2. What lies between the events is device time plus any
    gap in which the GPU waits for the host to launch the next kernel: for steps of a few
    microseconds of device work the host's launch cost shows, which is what an eager user sees.
    """
    from triton.testing import do_bench

    counter = itertools.count()
    return Times(*do_bench(lambda: step(next(counter) % n_sets), warmup=warmup_ms, rep=rep_ms,
                           quantiles=list(QUANTILES)))


def cuda_graph_ms(step: Step, n_sets: int, calls: int, *, setup: Optional[Callable[[], object]] = None,
                  warmup_ms: float = 25, rep_ms: float = 100) -> Times:
    """Milliseconds per step of a CUDA graph that runs ``step(c % n_sets)`` for ``c < calls``.

    For steps of microseconds the host's launch cost would otherwise be the measurement; in the
    graph the launches are back to back on the device, as in a graph-captured decode loop, and
    rotating over ``n_sets`` keeps each set's weights out of L2 by the time they come round again.

    ``setup`` runs on the capture stream before the warm-up (a backward step needs its forward
    there: autograd runs each backward op on the stream of its forward op, and only the capture
    stream is recorded). Warm-up on that stream also moves autotuning, compilation and library
    handle creation out of the capture, where they are not allowed. The garbage collector is off
    during capture: it could finalize a Triton kernel, whose module unload would invalidate the
    capture (triton.testing.do_bench_cudagraph does the same).
    """
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if setup is not None:
            setup()
        for i in range(2 * n_sets):
            step(i % n_sets)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, stream=stream):
            for c in range(calls):
                step(c % n_sets)
    finally:
        if gc_enabled:
            gc.enable()
    torch.cuda.synchronize()
    return Times(*do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))).scaled(1 / calls)


def cpu_median_ms(step: Step, n_sets: int, *, warmup: int = 2, min_reps: int = 5, min_time_s: float = 0.25,
                  max_reps: int = 200, before: Optional[Step] = None,
                  sync: Optional[Callable[[], object]] = None) -> Times:
    """Milliseconds of one ``step`` on the host clock: at least ``min_reps`` runs and at least
    ``min_time_s`` seconds of them (capped at ``max_reps``), after ``warmup`` runs.

    ``before(i)``, if given, runs ahead of every ``step(i)`` (warm-up included) outside the timed
    region: it resets what the step changes (weights, masks, optimizer state), so that every call
    does the same work. ``sync``, if given, runs just before the clock starts and just before it
    stops: with ``torch.cuda.synchronize`` this times device work on the host clock, the way to time
    a CUDA step that needs ``before`` (do_bench has no untimed place for it)."""
    for i in range(warmup):
        if before is not None:
            before(i % n_sets)
        step(i % n_sets)
    times = []
    for i in itertools.count():
        if len(times) >= max_reps:
            break
        if len(times) >= min_reps and sum(times) >= min_time_s:  # timed seconds: before() does not count
            break
        if before is not None:
            before(i % n_sets)
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        step(i % n_sets)
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return Times(statistics.median(times), p20, p80).scaled(1e3)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Bytes that ``fn`` allocates at its peak beyond what was allocated when it started (what it
    keeps plus its transients), from the caching allocator's statistics."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def device_median_ms(step: Step, n_sets: int, device: torch.device, *, quick: bool = False) -> Times:
    """``step``'s time on ``device``: do_bench on CUDA, ``cpu_median_ms`` on the CPU; ``quick`` takes
    few repeats (smoke tests)."""
    if device.type == "cuda":
        return cuda_events_ms(step, n_sets, **(dict(warmup_ms=5, rep_ms=10) if quick else {}))
    return cpu_median_ms(step, n_sets, **(dict(warmup=1, min_reps=3, min_time_s=0.0) if quick else {}))


def copy_gbps(device: torch.device, nbytes: int, *, quick: bool = False) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` random bytes, counting bytes read plus bytes
    written: the ceiling of any kernel that streams memory."""
    gen = torch.Generator(device=device).manual_seed(1)
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen, device=device)
    dst = torch.empty_like(src)
    ms = device_median_ms(lambda i: dst.copy_(src), 1, device, quick=quick).median
    return 2 * nbytes / ms / 1e6


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory (bytes) that ``fn`` adds to the process, Linux with glibc only: the
    kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident size
    before, after ``malloc_trim(0)`` has handed glibc's free pages back to the kernel.

    It counts every page ``fn`` touches that was not in use, torch's tensors and a C++ kernel's
    own buffers alike, to the 4 KiB page (thread stacks and library buffers touched for the first
    time count too). Without the trim, blocks freed by earlier calls would stay resident and a
    temporary reusing them would not show.
    """
    ctypes.CDLL(None).malloc_trim(0)  # returns 0 when there was nothing to release: not an error
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def interleaved_rounds_ms(methods: "dict[str, tuple[Step, int, Optional[Step]]]", rounds: int, reps: int,
                          sync: Optional[Callable[[], object]] = None) -> dict[str, list[float]]:
    """Per method, the ``cpu_median_ms`` of each of ``rounds`` rounds that interleave the methods
    (so a slow spell of a shared machine hits each alike), ``reps`` calls each after one warm-up
    call in the first round. The order rotates from round to round, so no method always runs
    right after the same other one. Ratios of two methods taken round by round (``paired_ratio``)
    cancel the machine's slow drifts that medians of each method alone keep."""
    names = list(methods)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step, n_sets, before = methods[name]
            per_round[name].append(cpu_median_ms(step, n_sets, warmup=1 if r == 0 else 0, min_reps=reps,
                                                 min_time_s=0.0, before=before, sync=sync).median)
    return per_round


def round_times(values: list[float]) -> Times:
    """The median of per-round values with their 20th and 80th percentiles (one round: itself)."""
    if len(values) == 1:
        return Times(values[0], values[0], values[0])
    p20, _, _, p80 = statistics.quantiles(values, n=5, method="inclusive")
    return Times(statistics.median(values), p20, p80)


def paired_ratio(a: list[float], b: list[float]) -> Times:
    """The median over rounds of ``a[r] / b[r]``, with its 20th and 80th percentiles."""
    return round_times([x / y for x, y in zip(a, b)])


def interleaved_ms(methods: "dict[str, tuple[Step, int, Optional[Step]]]", rounds: int, reps: int,
                   sync: Optional[Callable[[], object]] = None) -> dict[str, Times]:
    """``interleaved_rounds_ms``, summarised per method by :func:`round_times`."""
    return {name: round_times(v) for name, v in interleaved_rounds_ms(methods, rounds, reps, sync).items()}
