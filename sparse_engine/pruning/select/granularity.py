"""Granularity: which weights are chosen together.

Every weight is viewed as 2-D like its mask (``rows = shape[0]``, ``cols = numel // rows`` in
memory order); for a convolution ``(Co, Ci/groups, kH, kW)`` the columns are ``(ci, kh, kw)``
flattened, channel-major.

* ``"unstructured"``: each weight on its own; the selection unit is the weight.
* ``"N:M"`` (e.g. ``"2:4"``, ``"1:4"``, ``"4:8"``): along the input dimension, every group of
  ``M`` consecutive columns of a row (columns ``[M*j, M*j + M)``) keeps its ``N`` largest scores;
  ties go to the lower column index. This is a local rule (no threshold), so it is computed per
  group by counting, for each element, the elements of its group that rank before it, and keeping
  the elements with fewer than ``N`` (:func:`nm_mask`). ``cols % M == 0`` is required (a
  convolution with ``Ci*kH*kW`` not divisible by ``M`` is an error: exclude it). N:M fixes every
  layer's density at ``N/M``.
* ``"BxB"`` (e.g. ``"16x16"``, ``"32x32"``, ``"64x64"``): square blocks of the 2-D view, anchored
  at (0, 0). A block's score is the L2 norm of its elements' scores; blocks are selected through
  ``topk_mask`` like single weights, then expanded. Rows and columns must be divisible by ``B``
  (no partial edge blocks, so every unit holds ``B*B`` weights and kept counts are exact): a layer
  that is not is an error naming it, to exclude or prune at another granularity.

Masks come out as bool tensors of the weight's shape, ready for ``layer.set_mask``.
"""
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import selection_shape, topk_mask
from sparse_engine.pruning.select.checks import check_count

GRANULARITIES = ("unstructured", "N:M (e.g. '2:4')", "BxB (e.g. '32x32')")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
# Elements compared at once by nm_mask (each compares with its M - 1 neighbours).
_NM_CHUNK = 1 << 22


@dataclass(frozen=True)
class Granularity:
    """A parsed granularity: ``kind`` is ``"unstructured"``, ``"nm"`` (with ``n``, ``m``) or
    ``"block"`` (with ``block``)."""
    kind: str
    n: int = 0
    m: int = 0
    block: int = 1

    def __str__(self) -> str:
        return {"unstructured": "unstructured", "nm": f"{self.n}:{self.m}",
                "block": f"{self.block}x{self.block}"}[self.kind]

    def check_layer(self, name: str, shape) -> None:
        """Raise if a weight of shape ``shape`` cannot be pruned at this granularity."""
        rows, cols = selection_shape(shape)
        if self.kind == "nm" and cols % self.m:
            raise ValueError(f"granularity '{self}': layer '{name}' has {cols} input columns (weight {tuple(shape)} "
                             f"viewed as ({rows}, {cols})), not a multiple of M={self.m}; exclude it")
        if self.kind == "block" and (rows % self.block or cols % self.block):
            raise ValueError(f"granularity '{self}': layer '{name}' viewed as ({rows}, {cols}) is not divisible into "
                             f"{self.block}x{self.block} blocks; exclude it or use a smaller block")

    def units(self, shape) -> int:
        """Selection units of a weight of shape ``shape`` (weights, or blocks)."""
        rows, cols = selection_shape(shape)
        return (rows // self.block) * (cols // self.block)

    def unit_scores(self, scores: Tensor, kept: Optional[Tensor] = None) -> Tensor:
        """Scores of the selection units: the scores themselves, or block L2 norms of shape
        ``(rows / B, cols / B)``. With ``kept`` (bool, the weight's shape), pruned weights do not
        count and units without a kept weight score ``-inf`` (they stay pruned)."""
        if self.kind == "nm":
            raise ValueError("N:M granularity has no selection units; use nm_mask")
        if self.kind == "unstructured":
            if kept is None:
                return scores
            # Genuine -inf scores move up to the lowest finite value, so pruned weights rank strictly last.
            return torch.where(kept, scores.clamp_min(torch.finfo(scores.dtype).min), -torch.inf)
        if kept is not None:
            scores = torch.where(kept, scores, 0.0)
        norms = block_norms(scores, self.block)
        if kept is not None:
            any_kept = block_norms(kept.to(scores.dtype), self.block) > 0
            norms = torch.where(any_kept, norms, -torch.inf)
        return norms

    def kept_units(self, kept: Tensor) -> int:
        """Units holding at least one kept weight (``kept``: bool, the weight's shape)."""
        if self.kind == "block":
            return int((block_norms(kept.float(), self.block) > 0).sum())
        return int(kept.sum())

    def expand(self, unit_mask: Tensor, shape) -> Tensor:
        """Bool mask of the weight's shape from the bool mask of its units."""
        if self.kind == "unstructured":
            return unit_mask.reshape(shape)
        b = self.block
        return unit_mask.repeat_interleave(b, 0).repeat_interleave(b, 1).reshape(shape)


def parse_granularity(granularity) -> Granularity:
    """Parse ``"unstructured"``, ``"N:M"`` or ``"BxB"`` (a :class:`Granularity` passes through)."""
    if isinstance(granularity, Granularity):
        return granularity
    if isinstance(granularity, str):
        if granularity.strip() == "unstructured":
            return Granularity("unstructured")
        match = _NM.match(granularity)
        if match:
            n, m = int(match[1]), int(match[2])
            if not 1 <= n <= m:
                raise ValueError(f"granularity: N:M needs 1 <= N <= M, got '{granularity}'")
            return Granularity("nm", n=n, m=m)
        match = _BLOCK.match(granularity)
        if match:
            b, b2 = int(match[1]), int(match[2])
            if b != b2 or b < 1:
                raise ValueError(f"granularity: blocks must be square BxB with B >= 1, got '{granularity}'")
            return Granularity("block", block=b)
    raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")


def block_norms(scores: Tensor, block: int) -> Tensor:
    """L2 norms of the ``block x block`` blocks of the 2-D view of ``scores``: ``(rows/B, cols/B)`` float32."""
    block = check_count(block, "block", 1)
    rows, cols = selection_shape(scores.shape)
    if rows % block or cols % block:
        raise ValueError(f"scores: 2-D view ({rows}, {cols}) is not divisible into {block}x{block} blocks")
    s = scores.reshape(rows // block, block, cols // block, block).double()
    return s.square().sum((1, 3)).sqrt().float()


def _check_nm_counts(n, m) -> tuple[int, int]:
    n, m = check_count(n, "n", 1), check_count(m, "m", 1)
    if n > m:
        raise ValueError(f"n, m: expected 1 <= n <= m, got n={n}, m={m}")
    return n, m


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool mask keeping the ``n`` largest scores of every group of ``m`` consecutive columns.

    ``scores``: a weight's scores (rank >= 2, any float dtype); groups run along the columns of
    its 2-D view. An element is kept iff fewer than ``n`` elements of its group rank before it,
    where ``j`` ranks before ``i`` iff ``s_j > s_i``, or ``s_j == s_i`` and ``j < i`` (lower index
    wins ties; -0.0 equals +0.0). Exactly ``n`` kept per group.
    """
    rows, cols = selection_shape(scores.shape)
    n, m = _check_nm_counts(n, m)
    if cols % m:
        raise ValueError(f"scores: {cols} columns (shape {tuple(scores.shape)}) is not a multiple of m={m}")
    groups = scores.reshape(-1, m)
    before = torch.ones(m, m, dtype=torch.bool, device=scores.device).tril(-1)  # [i, j]: j < i
    keep = torch.empty(groups.shape, dtype=torch.bool, device=scores.device)
    step = max(1, _NM_CHUNK // (m * m))
    for start in range(0, groups.shape[0], step):
        g = groups[start:start + step]
        if torch.isnan(g).any():
            raise ValueError("scores: contains NaN; NaN scores cannot be ranked")
        si, sj = g.unsqueeze(-1), g.unsqueeze(-2)
        rank = ((sj > si) | ((sj == si) & before)).sum(-1)
        keep[start:start + step] = rank < n
    return keep.reshape(scores.shape)


def check_nm(mask: Tensor, n: int, m: int, exact: bool = False) -> bool:
    """True iff every group of ``m`` consecutive columns of ``mask``'s 2-D view keeps at most
    ``n`` elements (exactly ``n`` if ``exact``). ``mask``: bool, rank >= 2."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool torch.Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    n, m = _check_nm_counts(n, m)
    rows, cols = selection_shape(mask.shape)
    if cols % m:
        raise ValueError(f"mask: {cols} columns (shape {tuple(mask.shape)}) is not a multiple of m={m}")
    counts = mask.reshape(-1, m).sum(-1)
    return bool((counts == n).all() if exact else (counts <= n).all())


def select(scores: Sequence[Tensor], ks: Sequence[int], group: Sequence[int], names: Sequence[str]) -> list[Tensor]:
    """``topk_mask`` (keep the largest) unpacked to bool masks of the scores' shapes; a NaN
    error names the layer."""
    try:
        bits = topk_mask(list(scores), list(ks), group=list(group))
    except ValueError as e:
        match = re.match(r"scores\[(\d+)\]: contains NaN", str(e))
        if match is None:
            raise
        raise ValueError(f"scores of layer '{names[int(match[1])]}' contain NaN; NaN scores cannot be ranked") from None
    return [unpack_mask(b, selection_shape(s.shape)).reshape(s.shape) for b, s in zip(bits, scores)]
