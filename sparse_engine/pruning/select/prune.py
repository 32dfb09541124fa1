"""``prune_``: set the masks of a model's sparse layers from a score, an allocation and a granularity.

    report = prune_(model, 0.9)                                    # global magnitude
    prune_(model, 0.9, "saliency", "erk", loss_fn=F.cross_entropy, data=(x, y))
    prune_(model, 0.5, "wanda", granularity="2:4", calib_data=x)
    prune_(model, 0.98, "synflow", "global", input_shape=(1, 3, 32, 32), iterations=100)

Steps: score every weight of the layers being pruned (``sparse_engine.pruning.select.scores``), split
the kept count between layers (``allocation``), and keep the best-scored units of each group
through ``topk_mask`` at the chosen granularity (``granularity``), then ``layer.set_mask``.
"""
import math
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparsify import (Selector, SparsityReport, check_materialized, exclude_units, sparse_modules,
                                      sparsity_report, warn_empty_layers)
from sparse_engine.pruning.select.allocation import ALLOCATIONS, allocate
from sparse_engine.pruning.select.granularity import Granularity, nm_mask, parse_granularity, select
from sparse_engine.pruning.select.restore import restore_on_error
from sparse_engine.pruning.select.scores import (SCORE_FUNCTIONS, SCORES, _data_grads, custom_scores,
                                                 fggp_keep_scores, lamp_transform)

# What each score reads from prune_'s **inputs: (required, optional).
SCORE_INPUTS = {
    "magnitude": ((), ()),
    "gradient": ((), ("loss_fn", "data")),
    "saliency": ((), ("loss_fn", "data")),
    "grasp": (("loss_fn", "data"), ("temperature",)),
    "synflow": (("input_shape",), ("iterations",)),
    "wanda": (("calib_data",), ()),
    "lamp": ((), ()),
    "random": ((), ("generator",)),
    "fggp": (("rate",), ("loss_fn", "data")),
}
INPUTS = tuple(sorted({k for req, opt in SCORE_INPUTS.values() for k in req + opt}))
SYNFLOW_ITERATIONS = 100


def _check_score(score, inputs: dict) -> Optional[str]:
    """The score's name (None for a custom dict); inputs checked against what it reads."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise TypeError(f"prune_: unexpected input(s) {unknown}; inputs are {list(INPUTS)}")
    if isinstance(score, Mapping):
        if inputs:
            raise ValueError(f"prune_: custom scores read no inputs, got {sorted(inputs)}")
        return None
    if score not in SCORE_INPUTS:
        raise ValueError(f"score: expected one of {SCORES} or a dict {{layer name: tensor}}, got {score!r}")
    required, optional = SCORE_INPUTS[score]
    missing = [k for k in required if inputs.get(k) is None]
    if missing:
        raise ValueError(f"score '{score}' needs input(s) {missing} (e.g. prune_(..., {missing[0]}=...)); "
                         f"it reads {list(required + optional)}")
    unused = sorted(set(inputs) - set(required + optional))
    if unused:
        reads = list(required + optional) or "no inputs"
        raise ValueError(f"score '{score}' does not use input(s) {unused}; it reads {reads}")
    return score


def prunable_layers(model: nn.Module, exclude: Selector) -> list[tuple[str, MaskedModule]]:
    """The ``(name, layer)`` pairs of ``model``'s sparse layers not matched by ``exclude``; an error if none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = sparse_modules(model)
    if not layers:
        raise ValueError("model: expected a model with sparse layers (call sparse_engine.sparsify first), found none")
    if exclude is not None:
        layers = exclude_units(layers, exclude)
        if not layers:
            raise ValueError("exclude: every sparse layer is excluded; nothing to prune")
    check_materialized(layers)
    return layers


def _element_scores(score, model, names, inputs) -> list[Tensor]:
    if isinstance(score, Mapping):
        scores = custom_scores(model, score, names)
    else:
        kwargs = {k: v for k, v in inputs.items() if k != "iterations"}
        scores = SCORE_FUNCTIONS[score](model, names=names, **kwargs)
    return [scores[n] for n in names]


def _prune_round(model, layers, sparsity, score, allocation, gran: Granularity, regrow, min_density, inputs) -> None:
    names = [n for n, _ in layers]
    mods = [m for _, m in layers]
    shapes = [tuple(m.weight.shape) for m in mods]
    kept = None if regrow else [m.mask for m in mods]
    kept_or_none = kept if kept is not None else [None] * len(mods)

    if gran.kind == "nm":
        scores = _element_scores(score, model, names, inputs)
        # Pruned weights rank last in their group (as units do for the other granularities).
        masks = [nm_mask(Granularity("unstructured").unit_scores(s, k), gran.n, gran.m)
                 for s, k in zip(scores, kept_or_none)]
    else:
        units = None
        if score != "fggp":
            scores = _element_scores(score, model, names, inputs)
            units = [gran.unit_scores(s, k) for s, k in zip(scores, kept_or_none)]
        lamp_units = None
        if allocation == "lamp":
            lamp_units = []
            for m, k in zip(mods, kept_or_none):
                u = gran.unit_scores(m.weight.detach().abs().float(), k)
                lamp_units.append(torch.where(u == -torch.inf, -torch.inf, lamp_transform(u.clamp_min(0))))
        alloc = allocate(allocation, names, shapes, sparsity, numels=[gran.units(s) for s in shapes],
                         min_density=min_density, scores=units, lamp_scores=lamp_units)
        if kept is not None:
            _check_enough_kept(alloc, names, [gran.units(s) for s in shapes], [gran.kept_units(k) for k in kept],
                               sparsity, gran)
        if score == "fggp":
            grads = _data_grads(model, layers, inputs.get("loss_fn"), inputs.get("data"), "fggp")
            units = fggp_keep_scores([m.weight for m in mods], grads, kept, alloc.ks, alloc.group, inputs["rate"])
        unit_masks = select(units, alloc.ks, alloc.group, names)
        masks = [gran.expand(u, s) for u, s in zip(unit_masks, shapes)]
    if kept is not None:
        masks = [m & k for m, k in zip(masks, kept)]
    for m, mask in zip(mods, masks):
        m.set_mask(mask)


def _check_enough_kept(alloc, names, numels, available, sparsity, gran) -> None:
    unit = "weights" if gran.kind == "unstructured" else f"{gran} blocks"
    for g, k in enumerate(alloc.ks):
        members = [i for i, gi in enumerate(alloc.group) if gi == g]
        have = sum(available[i] for i in members)
        if k > have:
            where = f"layer '{names[members[0]]}'" if len(members) == 1 else "the layers"
            lowest = 1 - sum(available) / sum(numels)
            raise ValueError(f"sparsity={sparsity}: the allocation keeps {k} {unit} of {where} but only {have} are "
                             f"unpruned; with regrow=False pruned weights stay pruned (current sparsity "
                             f"{lowest:.4f}): pass regrow=True or a higher sparsity")


def prune_(model: nn.Module, sparsity: float, score: Union[str, Mapping[str, Tensor]] = "magnitude",
           allocation: Union[str, Mapping[str, float]] = "global", granularity: str = "unstructured", *,
           regrow: bool = False, exclude: Selector = None, min_density: Optional[float] = None,
           **inputs) -> SparsityReport:
    """Prune the sparse layers of ``model`` in place to ``sparsity`` and return its sparsity report.

    Args:
        model: a model with sparse layers (``sparse_engine.sparsify``).
        sparsity: the fraction of pruned weights over the layers being pruned (excluded layers do
            not count), in [0, 1). The kept count is ``n - round(sparsity * n)``, as
            ``torch.nn.utils.prune`` rounds (see ``allocation``).
        score: a name in ``SCORES`` (``sparse_engine.pruning.select.scores``) or a dict of custom scores
            ``{layer name: float tensor of the weight's shape}``; larger scores are kept.
        allocation: ``"global"``, ``"uniform"``, ``"uniform+"``, ``"erk"``, ``"lamp"`` or a dict
            ``{layer name: sparsity}`` (``sparse_engine.pruning.select.allocation``).
        granularity: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``; then ``sparsity`` must be
            ``1 - N/M`` and the allocation ``"global"`` or ``"uniform"``) or ``"BxB"`` blocks
            (e.g. ``"32x32"``) (``sparse_engine.pruning.select.granularity``).
        regrow: False (default): weights pruned now stay pruned: they score ``-inf`` (units
            without a kept weight, for blocks), so they are the first pruned, and a target that
            would keep more than the unpruned weights (of a layer, for per-layer allocations) is
            an error. Masks are ANDed with the current ones (a block or N:M group that still
            holds pruned weights keeps fewer). True: masks are recomputed over all weights.
            Pruned weights are exactly 0, so magnitude-like scores cannot bring them back (at a
            lower sparsity some zeros are kept, chosen by index, still zero); the dense gradients
            of ``gradient``/``saliency`` can.
        exclude: layers to leave as they are: glob patterns on names, a list of them, or a
            callable ``(name, module) -> bool``.
        min_density: per-layer floor on the kept fraction (``ceil(min_density * n_l)`` units).
        **inputs: what the score needs (``SCORE_INPUTS``): ``loss_fn`` and ``data`` (gradient,
            saliency, grasp, fggp; gradient/saliency/fggp fall back on ``.grad`` without them),
            ``temperature`` (grasp), ``input_shape`` and ``iterations`` (synflow, default 100),
            ``calib_data`` (wanda), ``generator`` (random), ``rate`` (fggp).

    SynFlow is iterative: ``iterations`` rounds, each recomputing the scores on the current masks
    and pruning to the density ``d0 * (d / d0) ** (t / iterations)`` (Tanaka et al.'s exponential
    schedule; ``d = 1 - sparsity``, ``d0`` the current density, 1 with ``regrow=True``), the
    last round exactly to ``sparsity``. With N:M it is one round (the pattern fixes the density).

    FGGP (``score="fggp"``, unstructured only, ``regrow=False``): see
    ``sparse_engine.pruning.scores.fggp_keep_scores``.

    Returns:
        ``sparsity_report(model)``: per-layer and global densities of all sparse layers.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    if not isinstance(regrow, bool):
        raise TypeError(f"regrow: expected a bool, got {type(regrow).__name__}")
    if min_density is not None and (isinstance(min_density, bool) or not isinstance(min_density, (int, float))
                                    or not 0.0 <= min_density <= 1.0):
        raise ValueError(f"min_density: expected None or a number in [0, 1], got {min_density!r}")
    if not isinstance(allocation, Mapping) and allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: expected one of {ALLOCATIONS} or a dict {{layer name: sparsity}}, "
                         f"got {allocation!r}")
    gran = parse_granularity(granularity)
    name = _check_score(score, inputs)
    layers = prunable_layers(model, exclude)
    for layer_name, m in layers:
        gran.check_layer(layer_name, m.weight.shape)

    if gran.kind == "nm":
        if not math.isclose(sparsity, 1 - gran.n / gran.m, abs_tol=1e-9):
            raise ValueError(f"granularity '{gran}' keeps {gran.n} of every {gran.m} weights (sparsity "
                             f"{1 - gran.n / gran.m:g}); got sparsity={sparsity}")
        if isinstance(allocation, Mapping) or allocation not in ("global", "uniform") or min_density is not None:
            raise ValueError(f"granularity '{gran}' fixes every layer's density: use allocation 'global' or "
                             f"'uniform' and no min_density")
    if name == "fggp":
        if gran.kind != "unstructured":
            raise ValueError(f"score 'fggp' prunes single weights: granularity must be 'unstructured', got '{gran}'")
        if regrow:
            raise ValueError("score 'fggp' prunes among the currently kept weights: regrow=True is not supported")
        if allocation == "global" and min_density is not None:
            raise ValueError("score 'fggp' with allocation 'global' does not support min_density; use a per-layer "
                             "allocation")

    if name == "synflow" and gran.kind != "nm":
        iterations = inputs.get("iterations", SYNFLOW_ITERATIONS)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations: expected an int >= 1, got {iterations!r}")
        total = sum(m.weight.numel() for _, m in layers)
        d0 = 1.0 if regrow else sum(int(m.mask.sum()) for _, m in layers) / total
        d = 1.0 - sparsity
        with restore_on_error(model):  # every round sets masks: a later round's error undoes the earlier ones
            for t in range(1, iterations + 1):
                s_t = sparsity if t == iterations or d0 == 0 else 1.0 - d0 * (d / d0) ** (t / iterations)
                _prune_round(model, layers, s_t, name, allocation, gran, regrow and t == 1, min_density, inputs)
    else:
        _prune_round(model, layers, sparsity, score if name is None else name, allocation, gran, regrow,
                     min_density, inputs)
    report = sparsity_report(model)
    warn_empty_layers(report, [n for n, _ in layers], "prune_")
    return report
