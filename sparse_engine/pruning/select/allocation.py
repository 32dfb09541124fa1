"""Layer-wise allocation: how many weights each layer keeps for a target global sparsity.

An allocation turns a global ``sparsity`` into kept counts. It either leaves the split between
layers to the scores (``"global"``: one selection over all layers, i.e. a global threshold) or
fixes one kept count per layer (every other method); ``prune_`` then keeps the best-scored
weights within each group through ``topk_mask``.

Methods (``densities`` below are kept fractions, ``d = 1 - sparsity``):

* ``"global"``: one group, ``K`` kept in total, split by the scores.
* ``"uniform"``: every layer at density ``d``.
* ``"uniform+"`` (Gale, Elsen and Hooker 2019, "The State of Sparsity in Deep Neural Networks"):
  the first layer stays dense, the last keeps at least 20%, and every other layer is at the one
  density ``x`` that meets the global target::

      n_first + n_last * max(0.2, x) + x * n_mid = d * n_total

  i.e. ``x = (d*n_total - n_first) / (n_total - n_first)`` when that is >= 0.2, else
  ``x = (d*n_total - n_first - 0.2*n_last) / n_mid``. "First" and "last" are in module order.
* ``"erk"`` (Erdos-Renyi-Kernel, Evci et al. 2020, RigL's ``sparse_utils``): density of layer l
  ``= eps * sum(shape_l) / prod(shape_l)``, with ``eps`` chosen to meet the target; layers whose
  density would exceed 1 are made dense and ``eps`` is solved again for the others until none
  exceeds 1 (RigL removes one layer at a time; the fixed point is the same).
* ``"lamp"`` (Lee et al. 2021): the per-layer counts that one global selection on LAMP scores
  keeps (the caller passes the LAMP scores).
* ``{name: sparsity}``: the named layers at their own sparsity, every other layer at
  ``sparsity``; there is then no global target.

``min_density`` is a per-layer floor: every layer keeps at least ``ceil(min_density * n_l)``.
Per-layer methods solve for their free parameter under the floors (layers held at the floor
leave the rest to the others), so the global target is still met; ``"global"`` first reserves
each layer's floor of best-scored weights, then selects the rest globally.

Rounding: the global kept count is ``K = n - round(sparsity * n)`` with Python's ``round``
(half to even), exactly as ``torch.nn.utils.prune`` rounds ``amount * n``; it equals
``round((1 - sparsity) * n)`` except at exact halves. Real per-layer targets ``n_l * d_l`` (which
sum to ``K``) become integers by largest remainders: each layer gets ``floor`` or ``ceil`` of its
target, the total is exactly ``K``, and ties go to the earlier layer. A target is infeasible
only when the floors (or dense layers) alone keep more than ``K``: that is an error.

Counts are in *selection units*: weights for unstructured pruning, blocks for block pruning
(``numels`` gives the units of each layer; ERK still uses the weight shapes).
"""
import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import selection_shape, topk_mask
from sparse_engine.pruning.select.checks import check_count, check_fraction, check_length, check_shapes

ALLOCATIONS = ("global", "uniform", "uniform+", "erk", "lamp")
UNIFORM_PLUS_LAST_MIN_DENSITY = 0.2


@dataclass(frozen=True)
class Allocation:
    """Kept counts for ``topk_mask``: layer i is selected in group ``group[i]``, and group g keeps
    ``ks[g]`` units. ``"global"`` is one group; per-layer allocations have one group per layer."""
    group: list[int]
    ks: list[int]

    @property
    def per_layer(self) -> bool:
        return len(self.ks) == len(self.group) and self.group == list(range(len(self.group)))


def target_kept(n: int, sparsity: float) -> int:
    """Kept count for ``sparsity`` (in [0, 1]) of ``n >= 0`` units: ``n - round(sparsity * n)``
    (as torch.nn.utils.prune)."""
    n = check_count(n, "n")
    return n - round(check_fraction(sparsity, "sparsity", what="a sparsity") * n)


def _ceil(x: float) -> int:
    # min_density * n is a float product: 0.2 * 10 = 2.0000000000000004 must floor to 2, not 3.
    return math.ceil(x * (1.0 - 1e-12))


def fit_densities(numels: Sequence[int], raw: Sequence[float], kept: float, lo: Sequence[float],
                  hi: Sequence[float]) -> list[float]:
    """Densities ``clamp(eps * raw_l, lo_l, hi_l)`` whose kept total ``sum(n_l * d_l)`` is ``kept``.

    ``f(eps) = sum n_l clamp(eps raw_l, lo_l, hi_l)`` is continuous and non-decreasing, linear
    between the breakpoints ``lo_l / raw_l`` and ``hi_l / raw_l``: find the piece that reaches
    ``kept``, then solve it exactly as RigL does, ``eps = (kept - held) / sum(n_l raw_l)`` over
    the layers not held at a bound. Layers with ``lo_l == hi_l`` are fixed.
    """
    numels = [check_count(v, f"numels[{i}]") for i, v in enumerate(numels)]
    raw = [float(r) for r in check_length(raw, len(numels), "raw", "layer")]
    lo = [float(v) for v in check_length(lo, len(numels), "lo", "layer")]
    hi = [float(v) for v in check_length(hi, len(numels), "hi", "layer")]
    for name, values in (("raw", raw), ("lo", lo), ("hi", hi)):
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            raise ValueError(f"{name}: expected finite numbers >= 0, got {bad[0]!r}")
    if isinstance(kept, bool) or not isinstance(kept, numbers.Real) or not math.isfinite(kept):
        raise ValueError(f"kept: expected a finite number of weights, got {kept!r}")
    fixed = [lo_l >= hi_l for lo_l, hi_l in zip(lo, hi)]

    def clamped(eps: float) -> list[float]:
        return [lo_l if f else min(max(eps * r, lo_l), hi_l) for r, lo_l, hi_l, f in zip(raw, lo, hi, fixed)]

    def total(eps: float) -> float:
        return sum(n * d for n, d in zip(numels, clamped(eps)))

    least, most = total(0.0), sum(n * (lo_l if f else hi_l) for n, lo_l, hi_l, f in zip(numels, lo, hi, fixed))
    tol = 1e-9 * max(1.0, most)
    if kept < least - tol or kept > most + tol:
        raise ValueError(f"cannot keep {kept:g} weights: the bounds on the layers' densities allow "
                         f"{least:g} to {most:g}")
    breaks = sorted({b / r for r, lo_l, hi_l, f in zip(raw, lo, hi, fixed) if not f and r > 0
                     for b in (lo_l, hi_l)})
    prev = 0.0
    for b in breaks + [math.inf]:
        if b == math.inf or total(b) >= kept:
            # On (prev, b) every free layer is either held at a bound or linear in eps.
            mid = prev + 1.0 if b == math.inf else (prev + b) / 2
            held, slope = 0.0, 0.0
            for n, r, lo_l, hi_l, f in zip(numels, raw, lo, hi, fixed):
                if f or mid * r <= lo_l:
                    held += n * lo_l
                elif mid * r >= hi_l:
                    held += n * hi_l
                else:
                    slope += n * r
            eps = prev if slope == 0 else (kept - held) / slope
            return clamped(eps)
        prev = b
    raise AssertionError("unreachable: total(inf) is the largest kept count")


def apportion(targets: Sequence[float], total: int, lo: Sequence[int], hi: Sequence[int]) -> list[int]:
    """Integers ``c_l`` in ``[lo_l, hi_l]`` summing to ``total``, each the floor or ceil of
    ``targets[l]`` where the bounds allow (largest remainders; ties to the earlier layer)."""
    n = len(targets)
    lo, hi = check_length(lo, n, "lo", "target"), check_length(hi, n, "hi", "target")
    total = check_count(total, "total")
    bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t)]
    if bad:
        raise ValueError(f"targets: expected finite numbers, got {bad[0]!r}")
    if not sum(lo) <= total <= sum(hi):
        raise ValueError(f"cannot keep {total} units with per-layer bounds summing to [{sum(lo)}, {sum(hi)}]")
    counts = [min(max(math.floor(t), a), b) for t, a, b in zip(targets, lo, hi)]
    left = total - sum(counts)
    while left:
        step = 1 if left > 0 else -1
        # Give to the largest remainders first (take from the smallest); stable sort keeps layer order.
        order = sorted((i for i in range(len(counts)) if (counts[i] < hi[i] if step > 0 else counts[i] > lo[i])),
                       key=lambda i: (targets[i] - counts[i]) * -step)
        for i in order[:abs(left)]:
            counts[i] += step
        left = total - sum(counts)
    return counts


def _raw_and_floors(method: str, shapes: Sequence[tuple], floor: float) -> tuple[list[float], list[float]]:
    """The relative densities ``raw`` and the per-layer lower bounds of a per-layer method."""
    n = len(shapes)
    lo = [floor] * n
    if method == "erk":
        return [sum(s) / math.prod(s) for s in shapes], lo
    if method == "uniform+":
        lo[0] = 1.0
        if n > 1:
            lo[-1] = max(lo[-1], UNIFORM_PLUS_LAST_MIN_DENSITY)
    return [1.0] * n, lo


def layer_densities(method: str, shapes: Sequence[Sequence[int]], density: float, min_density: float = 0.0,
                    numels: Optional[Sequence[int]] = None) -> list[float]:
    """Real per-layer densities of ``"uniform"``, ``"uniform+"`` or ``"erk"`` for a global ``density``
    (module docstring), before rounding to counts. ``numels`` defaults to the shapes' numel."""
    if method not in ("uniform", "uniform+", "erk"):
        raise ValueError(f"method: expected 'uniform', 'uniform+' or 'erk', got {method!r}")
    shapes = check_shapes(shapes)
    if method == "erk":
        _check_erk_shapes(shapes, [f"shapes[{i}]" for i in range(len(shapes))])
    density = check_fraction(density, "density", what="a density")
    min_density = check_fraction(min_density, "min_density", what="a density")
    numels = _numels(shapes, numels)
    raw, lo = _raw_and_floors(method, shapes, min_density)
    return fit_densities(numels, raw, density * sum(numels), lo, [1.0] * len(shapes))


def _numels(shapes: list[tuple[int, ...]], numels) -> list[int]:
    if numels is None:
        return [math.prod(s) for s in shapes]
    return [check_count(v, f"numels[{i}]") for i, v in enumerate(check_length(numels, len(shapes), "numels", "layer"))]


def erk_densities(shapes: Sequence[Sequence[int]], density: float, min_density: float = 0.0) -> list[float]:
    """Erdos-Renyi-Kernel densities for a global ``density``: ``layer_densities("erk", ...)``."""
    return layer_densities("erk", shapes, density, min_density)


def global_counts(scores: Sequence[Tensor], kept: int, floors: Sequence[int]) -> list[int]:
    """Per-layer kept counts of one global selection of ``kept`` units that first guarantees each
    layer its ``floors[l]`` best units (two ``topk_mask`` passes: per layer, then global with the
    reserved units at +inf)."""
    floors = [check_count(f, f"floors[{i}]") for i, f in enumerate(check_length(floors, len(scores), "floors",
                                                                                 "score tensor"))]
    if any(floors):
        reserved = [unpack_mask(b, selection_shape(s.shape)).view(s.shape)
                    for b, s in zip(topk_mask(scores, list(floors)), scores)]
        scores = [torch.where(r, torch.inf, s) for r, s in zip(reserved, scores)]
    bits = topk_mask(scores, kept)
    return [int(unpack_mask(b, selection_shape(s.shape)).sum()) for b, s in zip(bits, scores)]


def _check_erk_shapes(shapes: list[tuple[int, ...]], labels: list[str]) -> None:
    for label, s in zip(labels, shapes):
        if not all(s):
            raise ValueError(f"{label}: ERK's density sum(shape) / prod(shape) needs every dimension >= 1, got "
                             f"shape {s} (exclude the layer)")


def _check_layers(allocation, names, shapes) -> tuple[list[str], list[tuple[int, ...]]]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(f"names: expected a list of layer names, got {type(names).__name__}")
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"names: expected a list of layer names (str), got {names!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"names: expected distinct layer names, got {duplicates} more than once")
    shapes = check_shapes(check_length(shapes, len(names), "shapes", "layer name"))
    if allocation == "erk":
        _check_erk_shapes(shapes, [f"allocation 'erk': layer '{n}'" for n in names])
    return names, shapes


def allocate(allocation: Union[str, Mapping[str, float]], names: Sequence[str], shapes: Sequence[Sequence[int]],
             sparsity: float, *, numels: Optional[Sequence[int]] = None, min_density: Optional[float] = None,
             scores: Optional[Sequence[Tensor]] = None, lamp_scores: Optional[Sequence[Tensor]] = None) -> Allocation:
    """Kept counts of the layers ``names`` (weights of shapes ``shapes``) for ``sparsity``.

    Args:
        allocation: one of ``ALLOCATIONS`` or a dict ``{layer name: sparsity}``.
        names, shapes: the layers, in module order.
        sparsity: global target in [0, 1).
        numels: selection units of each layer (default: the weights' numel).
        min_density: per-layer floor on the kept fraction, or None.
        scores: the unit scores (float, one tensor a layer); needed by ``"global"`` with a floor.
        lamp_scores: LAMP scores of the units; needed by ``"lamp"``.
    Returns:
        an :class:`Allocation`.
    """
    names, shapes = _check_layers(allocation, names, shapes)
    sparsity = check_fraction(sparsity, "sparsity", upper_inclusive=False, what="a sparsity")
    numels = _numels(shapes, numels)
    floor = 0.0 if min_density is None else check_fraction(min_density, "min_density", what="a density")
    floors = [_ceil(floor * n) for n in numels]
    total = sum(numels)
    kept = target_kept(total, sparsity)

    if isinstance(allocation, Mapping):
        unknown = sorted(set(allocation) - set(names))
        if unknown:
            raise ValueError(f"allocation: unknown layer name(s) {unknown}; the layers being pruned are {names}")
        counts = []
        for name, n, f in zip(names, numels, floors):
            s = allocation.get(name, sparsity)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
                raise ValueError(f"allocation['{name}']: expected a sparsity in [0, 1], got {s!r}")
            counts.append(max(target_kept(n, s), f))
        return Allocation(list(range(len(names))), counts)

    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {ALLOCATIONS} or a dict {{layer name: sparsity}}, "
                         f"got {allocation!r}")
    if sum(floors) > kept:
        raise ValueError(f"min_density={min_density} keeps at least {sum(floors)} of {total} units, more than the "
                         f"{kept} that sparsity={sparsity} keeps; lower min_density or the sparsity")
    if allocation == "global":
        if not any(floors):
            return Allocation([0] * len(names), [kept])
        if scores is None:
            raise ValueError("scores: allocation 'global' with min_density needs the scores")
        scores = check_length(scores, len(names), "scores", "layer")
        return Allocation(list(range(len(names))), global_counts(scores, kept, floors))
    if allocation == "lamp":
        if lamp_scores is None:
            raise ValueError("lamp_scores: allocation 'lamp' needs the LAMP scores of the layers")
        lamp_scores = check_length(lamp_scores, len(names), "lamp_scores", "layer")
        return Allocation(list(range(len(names))), global_counts(lamp_scores, kept, floors))

    raw, lo = _raw_and_floors(allocation, shapes, floor)
    try:
        densities = fit_densities(numels, raw, kept, lo, [1.0] * len(numels))
        # Dense layers stay whole; floors are whole units at or above min_density.
        lo_counts = [n if d >= 1.0 else _ceil(b * n) for d, b, n in zip(densities, lo, numels)]
        counts = apportion([d * n for d, n in zip(densities, numels)], kept, lo_counts, numels)
    except ValueError as e:
        extra = (" (uniform+ keeps the first layer dense and at least 20% of the last)"
                 if allocation == "uniform+" else "")
        raise ValueError(f"allocation '{allocation}' cannot meet sparsity={sparsity}{extra}: {e}") from None
    return Allocation(list(range(len(names))), counts)
