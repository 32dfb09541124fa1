"""The mask update of dynamic sparse training: drop the weakest kept weights, grow as many new ones.

One update of a layer that keeps ``n`` weights, with drop count ``d`` (RigL, Evci et al. 2020,
"Rigging the Lottery"; SET, Mocanu et al. 2018):

1. **drop**: of the ``n`` kept weights, keep the ``n - d`` with the largest drop score (``|w|``);
2. **grow**: of every position *not* kept by step 1, the ``d`` with the largest grow score
   (RigL: ``|g|``, the dense gradient; SET: uniform random) join the mask.

The layer keeps exactly ``n`` weights, so the sparsity is unchanged. As in RigL's code (its default
``reinit_when_same=False``), a weight dropped in step 1 may be grown back in step 2: it then
keeps its value and optimizer state, as if it had not been dropped. A *grown* weight (pruned
before the update) starts at exactly 0 with its optimizer state (momentum, Adam moments) zeroed
here: ``mask_optimizer`` clears the state of newly *pruned* entries only, and a pruned entry's
state is not always zero (a weight shared with a dense module, e.g. a tied embedding, gets dense
gradients and momentum at its pruned positions).

Ties follow ``topk_mask``'s rule: the earlier layer, then the lower flat index, wins.

``drop_and_grow_masks`` selects with two grouped ``topk_mask`` calls over all layers at once
(a radix select, no sort, no concatenated copy); ``drop_and_grow_masks_ref`` is the readable
plain-torch version (a stable sort of each layer, as RigL's reference code sorts), which the
tests hold the fast one to.
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import selection_shape, topk_mask

_TOP = torch.finfo(torch.float32).max


def drop_counts(kept: Sequence[int], fraction: float) -> list[int]:
    """Weights to drop in each layer: ``floor(fraction * kept_l)`` (RigL's ``int(n_ones * drop_fraction)``)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a drop fraction in [0, 1], got {fraction!r}")
    return [math.floor(fraction * int(n)) for n in kept]


def _check(masks, drop_scores, grow_scores, n_drop) -> None:
    if not (len(masks) == len(drop_scores) == len(grow_scores) == len(n_drop)):
        raise ValueError(f"masks, drop_scores, grow_scores, n_drop: expected one per layer, got "
                         f"{len(masks)}, {len(drop_scores)}, {len(grow_scores)}, {len(n_drop)}")
    for i, (m, ds, gs, d) in enumerate(zip(masks, drop_scores, grow_scores, n_drop)):
        if m.dtype != torch.bool:
            raise TypeError(f"masks[{i}]: expected dtype torch.bool, got {m.dtype}")
        for name, s in (("drop_scores", ds), ("grow_scores", gs)):
            if s.shape != m.shape:
                raise ValueError(f"{name}[{i}]: expected shape {tuple(m.shape)} (the mask's), got {tuple(s.shape)}")
            if torch.isnan(s).any():
                raise ValueError(f"{name}[{i}]: contains NaN; NaN scores cannot be ranked")
        kept = int(m.sum())
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= kept:
            raise ValueError(f"n_drop[{i}]: expected an int in [0, {kept}] (the layer's kept weights), got {d!r}")


def _finite(s: Tensor) -> Tensor:
    # +-inf would tie with the sentinels that mark kept/pruned positions.
    return s.detach().float().clamp(-_TOP, _TOP)


def drop_and_grow_masks(masks: Sequence[Tensor], drop_scores: Sequence[Tensor], grow_scores: Sequence[Tensor],
                        n_drop: Sequence[int]) -> list[Tensor]:
    """New masks after one drop-and-grow update of every layer (module docstring).

    Args:
        masks: bool, one per layer (the current masks).
        drop_scores: float, the masks' shapes; kept weights with the smallest are dropped.
        grow_scores: float, the masks' shapes; the largest not kept after the drop are grown.
        n_drop: weights to drop (and grow) per layer, at most the layer's kept count.
    Returns:
        bool masks of the same shapes, each with exactly as many kept weights as before.
    """
    masks = list(masks)
    _check(masks, drop_scores, grow_scores, list(n_drop))
    kept = [int(m.sum()) for m in masks]
    layers = list(range(len(masks)))
    # Step 1 keeps the kept weights with the largest drop scores; pruned ones rank last (-inf).
    drop_rank = [torch.where(m, _finite(s), -torch.inf) for m, s in zip(masks, drop_scores)]
    bits = topk_mask(drop_rank, [k - d for k, d in zip(kept, n_drop)], group=layers)
    survivors = [unpack_mask(b, selection_shape(m.shape)).view(m.shape) for b, m in zip(bits, masks)]
    # Step 2: survivors rank first (+inf), every other position by its grow score.
    grow_rank = [torch.where(s_, torch.inf, _finite(g)) for s_, g in zip(survivors, grow_scores)]
    bits = topk_mask(grow_rank, kept, group=layers)
    return [unpack_mask(b, selection_shape(m.shape)).view(m.shape) for b, m in zip(bits, masks)]


def _top_positions(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of 1-D ``scores``; ties to the lower index (stable sort)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    chosen[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    return chosen


def drop_and_grow_masks_ref(masks: Sequence[Tensor], drop_scores: Sequence[Tensor], grow_scores: Sequence[Tensor],
                            n_drop: Sequence[int]) -> list[Tensor]:
    """Readable reference of :func:`drop_and_grow_masks`: each layer on its own, with sorts."""
    masks = list(masks)
    _check(masks, drop_scores, grow_scores, list(n_drop))
    out = []
    for mask, drop, grow, d in zip(masks, drop_scores, grow_scores, n_drop):
        kept = mask.flatten()
        n = int(kept.sum())
        drop = drop.detach().flatten().double()
        grow = grow.detach().flatten().double()
        # Drop: among the kept weights, the n - d with the largest drop score survive.
        survivors = _top_positions(torch.where(kept, drop, -torch.inf), n - d) & kept
        # Grow: among the positions that did not survive, the d with the largest grow score.
        candidates = torch.nonzero(~survivors).flatten()
        grown = torch.zeros_like(kept)
        grown[candidates[_top_positions(grow[candidates], d)]] = True
        out.append((survivors | grown).view(mask.shape))
    return out


@torch.no_grad()
def clear_optimizer_state_(optimizer: Optional[torch.optim.Optimizer], param: Tensor, positions: Tensor) -> None:
    """Zero, at ``positions`` (bool, ``param``'s shape), every optimizer state tensor of ``param``
    shaped like it (momentum buffers, Adam's ``exp_avg``/``exp_avg_sq``, ...)."""
    if optimizer is None:
        return
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(positions, 0)


@torch.no_grad()
def drop_and_grow_(layers: Sequence[MaskedModule], grow_scores: Sequence[Tensor], fraction: float,
                   optimizer: Optional[torch.optim.Optimizer] = None, *, reference: bool = False) -> dict:
    """One drop-and-grow update of ``layers`` in place: drop by ``|w|``, grow by ``grow_scores``.

    Each layer drops ``floor(fraction * kept)`` weights (``drop_counts``); masks change through
    ``layer.set_mask`` (which zeroes the dropped weights); grown weights are set to 0 and their
    optimizer state in ``optimizer`` is zeroed. ``reference=True`` selects with
    :func:`drop_and_grow_masks_ref` (same masks; for tests and benchmarks).

    Returns:
        ``{"dropped": d, "grown": g}``: weights that left the masks and weights that joined them
        (pruned before the update), summed over layers; ``g == d`` minus the weights dropped and
        grown back.
    """
    layers = list(layers)
    masks = [m.mask for m in layers]
    n_drop = drop_counts([int(m.sum()) for m in masks], fraction)
    select = drop_and_grow_masks_ref if reference else drop_and_grow_masks
    new = select(masks, [m.weight.abs() for m in layers], list(grow_scores), n_drop)
    dropped = grown_total = 0
    for layer, old, mask in zip(layers, masks, new):
        grown = mask & ~old
        n_grown = int(grown.sum())
        if n_grown == 0:
            continue  # every dropped weight was grown back: nothing changed
        layer.set_mask(mask)
        layer.weight.masked_fill_(grown, 0)
        clear_optimizer_state_(optimizer, layer.weight, grown)
        dropped += int((old & ~mask).sum())
        grown_total += n_grown
    return {"dropped": dropped, "grown": grown_total}
