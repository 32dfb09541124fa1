"""Dispatch by measurement for the masked ops (``masked_linear``, ``masked_conv2d``).

Each masked op has implementations that compute the same result:

* ``"fused"``: the op's own kernels (``sparse_engine::masked_linear`` / ``masked_conv2d``: Triton or
  CUDA on GPUs, C++ or torch on CPU), which never build ``W*M`` on a GPU;
* ``"materialized"``: ``W*M`` built by ``masked_weight`` (one pass from the packed bits), then the
  vendor op (``F.linear`` / ``F.conv2d``: BLAS/oneDNN, cuBLAS/cuDNN). Its weight gradient is
  ``masked_weight`` of ``dW``: exact zeros at pruned positions, as with the fused kernels. On the CPU
  it skips the copy when a read-only pass over ``W`` finds the pruned entries already zeros (what
  ``mask_optimizer`` keeps): the vendor op then reads ``W`` itself, with the same values, and ``dW``
  is masked in place (``masked_weight_for_op``). The check runs on every call: writes through
  ``weight.data`` bump no version counter, so no cheaper signal could tell that W changed.

Both differ only by the rounding of the matmul, within the tolerance the tests hold the fused
kernels to. Like ``torch.backends.cudnn.benchmark``, the first call with a new key (op, shapes,
dtypes, device, whether a backward follows, the implementation set) times each implementation
(forward, and backward when gradients are needed, on copies of the inputs: the caller's tensors
and autograd graph are untouched; RNG streams are forked) and caches the fastest; later calls look it
up (``lookup``: ``masked_linear`` then also skips its argument checks, which passed for that key before).

Control:

* ``pin("fused")`` / ``pin("materialized")`` / ``pin(None)`` (measure, the default), or the
  environment variable ``SPARSE_ENGINE_MASKED_IMPL`` (read at import; ``pin`` overrides it);
* ``save(path)`` / ``load(path)`` persist the cache (JSON); ``choices()`` shows it; ``clear()``.

Under ``torch.compile`` nothing is measured or looked up (timing would break the graph): the
pinned implementation is used, else ``"fused"``.
"""
import json
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

IMPLEMENTATIONS = ("fused", "materialized")
ENV_VAR = "SPARSE_ENGINE_MASKED_IMPL"
# Timed calls per implementation after one warm-up, interleaved; the fastest call of each is
# compared (noise from other work on the machine only adds time; with 3 calls and medians, the
# choice between implementations within 10% of each other flipped between runs).
_REPS = 5

_cache: dict[str, str] = {}
# The same choices by a key that is cheap to build (tuples, no string formatting): the lookup runs
# on every call of every masked layer. Rebuilt from _cache on a miss; cleared with it.
_fast: dict[tuple, str] = {}


def _check_implementation(implementation, argname: str) -> Optional[str]:
    if implementation is None or implementation == "auto":
        return None
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{argname}: expected one of {IMPLEMENTATIONS}, 'auto' or None, got {implementation!r}")
    return implementation


_pinned: Optional[str] = _check_implementation(os.environ.get(ENV_VAR) or None, ENV_VAR)


def pin(implementation: Optional[str]) -> None:
    """Use ``implementation`` (``"fused"`` or ``"materialized"``) for every masked op; ``None`` or
    ``"auto"`` measures (the default)."""
    global _pinned
    _pinned = _check_implementation(implementation, "implementation")


def pinned() -> Optional[str]:
    """The pinned implementation, or None when choosing by measurement."""
    return _pinned


def choices() -> dict[str, str]:
    """A copy of the cache: ``{key: implementation}``."""
    return dict(_cache)


def clear() -> None:
    """Forget every measured choice."""
    _cache.clear()
    _fast.clear()


def save(path: Union[str, Path]) -> None:
    """Write the cache to ``path`` (JSON)."""
    Path(path).write_text(json.dumps({"version": 1, "choices": _cache}, indent=1, sort_keys=True))


def load(path: Union[str, Path], keep_mine: bool = False) -> None:
    """Merge the choices saved by :func:`save` at ``path`` into the cache (with ``keep_mine``, not over the
    choices this process has already made)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("choices"), dict):
        raise ValueError(f"path: {str(path)!r} is not a dispatch cache written by sparse_engine.ops.dispatch.save")
    for key, impl in data["choices"].items():
        _check_implementation(impl, f"path: {str(path)!r}: choice for {key!r}")
        if not (keep_mine and key in _cache):
            _cache[key] = impl
    _fast.clear()


def cache_key(op: str, tensors: tuple, extra: tuple = ()) -> str:
    """The key of a call: op, each tensor's shape/dtype (None for absent ones), device, whether a
    backward will run, ``extra`` (e.g. convolution parameters) and the implementation set."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in present)
    parts = [op, str(device), "bwd" if backward else "fwd"]
    parts += ["-" if t is None else f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in tensors]
    parts += [repr(tuple(extra)), ",".join(IMPLEMENTATIONS)]
    return "|".join(parts)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (synchronising CUDA before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def _measure(run: Callable[[str, tuple], torch.Tensor], tensors: tuple) -> str:
    """The fastest implementation on detached copies of ``tensors`` (leaves that need grad where the
    originals do), timing the forward and, when gradients are needed, the backward."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in present)
    copies = tuple(None if t is None else t.detach().requires_grad_(t.requires_grad and t.is_floating_point())
                   for t in tensors)

    def call(impl):
        out = run(impl, copies)
        if backward:
            out.backward(torch.ones_like(out))
            for t in copies:
                if t is not None:
                    t.grad = None

    times = {impl: [] for impl in IMPLEMENTATIONS}
    # Random ops of an implementation (a recurrent layer's dropout) draw while timing: the RNG streams are
    # left as they were, so a run that measures draws what one that finds the choice cached does.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for rep in range(_REPS + 1):
            for impl in IMPLEMENTATIONS:
                ms = time_ms(lambda: call(impl), device)
                if rep:  # the first round warms up (allocations, autotuning)
                    times[impl].append(ms)
    return min(IMPLEMENTATIONS, key=lambda impl: min(times[impl]))


def _fast_key(op: str, tensors: tuple, extra: tuple) -> tuple:
    """The in-memory key of a call: ``extra`` (its repr where it holds lists), each tensor's shape,
    dtype and device, and whether a backward will run."""
    try:
        hash(extra)
    except TypeError:
        extra = repr(extra)
    key = [op, extra]
    backward = False
    for t in tensors:
        if t is None:
            key.append(None)
        else:
            key += (t.shape, t.dtype, t.device)
            backward = backward or t.requires_grad
    key.append(backward and torch.is_grad_enabled())
    return tuple(key)


def lookup(op: str, tensors: tuple, extra: tuple = ()) -> Optional[str]:
    """The implementation chosen before for a call with this key, or None (then check the
    arguments and call :func:`choose`). A key is only stored by ``choose``, which the ops call after
    checking their arguments, so a hit also means arguments like these passed the checks. None
    while an implementation is pinned (``choose`` returns the pin) and under ``torch.compile``."""
    if _pinned is not None or torch.compiler.is_compiling():
        return None
    try:
        return _fast.get(_fast_key(op, tensors, extra))
    except AttributeError:  # not tensors: the checks will say
        return None


def choose(op: str, run: Callable[[str, tuple], torch.Tensor], tensors: tuple, extra: tuple = (),
           key_tensors: Optional[tuple] = None) -> str:
    """The implementation to run ``op`` on ``tensors`` with: the pinned one, else the cached choice
    for the call's key, else measured now with ``run(implementation, tensors)`` and cached.
    ``key_tensors`` (default ``tensors``): the tensors whose shapes, dtypes and devices the key holds,
    when the choice must not depend on all of ``tensors``' (a stacked op's number of models)."""
    if _pinned is not None:
        return _pinned
    if torch.compiler.is_compiling():
        return "fused"
    keyed = tensors if key_tensors is None else key_tensors
    fast = _fast_key(op, keyed, extra)
    impl = _fast.get(fast)
    if impl is None:
        key = cache_key(op, keyed, extra)
        impl = _cache.get(key)
        if impl is None:
            impl = _cache[key] = _measure(run, tensors)
        _fast[fast] = impl
    return impl
