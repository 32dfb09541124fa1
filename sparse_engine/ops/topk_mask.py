"""``sparse_engine::topk_mask``: keep exactly k elements across many score tensors at once.

Today's tools concatenate every score into one tensor and call ``torch.topk``, ``sort`` or
``kthvalue``: an O(n) copy, and on GPUs a single-SM path for large 1-D inputs. The kernels here
find each group's threshold with a radix (histogram) select that streams over the tensors in place
with O(groups x bins) extra memory, then write bit-packed masks directly.

Rule (all kernels give bit-identical masks):
    Within each group of tensors, elements are ranked by score (descending if ``largest``, else
    ascending); ties are broken by tensor index, then flat (row-major) index: the earlier element
    wins. The ``k`` best-ranked elements of the group are kept, so exactly ``k`` bits are set.
    ``-0.0`` equals ``+0.0``; infinities order normally; NaN is an error.

Masks come back bit-packed like every mask of the library: a tensor of rank >= 2 is viewed as
``(shape[0], prod(shape[1:]))``, one of rank <= 1 as ``(1, numel)`` (``selection_shape``), and
packed along the last dimension into int32 words (``sparse_engine.ops.mask_pack``), so
``unpack_mask(mask, scores[i].shape)`` gives the bool mask of any rank, 0-d included.
"""
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sparse_engine import _C
from sparse_engine.ops.mask_pack import WORD_BITS, pack_mask_ref, selection_shape

SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_count(value) -> bool:
    """An int (or a SymInt under torch.compile), not a bool and not a tensor."""
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def _check_scores(scores) -> list[Tensor]:
    if isinstance(scores, Tensor):
        scores = [scores]
    if isinstance(scores, (str, bytes)):
        raise TypeError(f"scores: expected a tensor or a list of tensors, got {type(scores).__name__}")
    try:
        scores = list(scores)
    except TypeError:
        raise TypeError(f"scores: expected a tensor or a list of tensors, got {type(scores).__name__}") from None
    if not scores:
        raise ValueError("scores: expected a non-empty list of tensors")
    for i, s in enumerate(scores):
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{i}]: expected a torch.Tensor, got {type(s).__name__}")
        if s.dtype not in SCORE_DTYPES:
            raise TypeError(f"scores[{i}]: expected dtype in {SCORE_DTYPES} (cast float64 scores explicitly), "
                            f"got {s.dtype}")
        if s.dtype != scores[0].dtype:
            raise TypeError(f"scores[{i}]: expected dtype {scores[0].dtype} (that of scores[0]); "
                            f"all score tensors must share one dtype, got {s.dtype}")
        if s.device != scores[0].device:
            raise ValueError(f"scores[{i}]: expected device {scores[0].device} (that of scores[0]); "
                             f"all score tensors must share one device, got {s.device}")
    return scores


def topk_mask(scores: Union[Tensor, Sequence[Tensor]], k: Union[int, Sequence[int]], largest: bool = True,
              *, group: Optional[Sequence[int]] = None, backend: str = "triton") -> list[Tensor]:
    """Bit-packed masks keeping exactly ``k`` elements across ``scores`` (see the module docstring).

    Args:
        scores: a tensor or a list of tensors, float32/float16/bfloat16, one device, any ranks.
        k: an int: the ``k`` best over all tensors (a global threshold); or a list with one k per
            tensor (per-tensor selection); or, with ``group``, one k per group. Counts are Python
            ints (numpy ints too); a tensor is refused (pass ``int(k)``: reading a device tensor
            would be a hidden synchronisation and a graph break under ``torch.compile``).
        largest: keep the largest scores (else the smallest).
        group: optional group index of each tensor; groups are selected independently.
        backend: CUDA kernel, ``"triton"`` (default) or ``"cuda"`` (C++); ignored on CPU.
    Returns:
        One int32 packed mask per tensor, of shape ``(rows, ceil(cols / 32))`` for the
        ``(rows, cols)`` view above (``unpack_mask(mask, scores[i].shape)`` unpacks it).
    """
    scores = _check_scores(scores)
    n = len(scores)
    ks = _check_k(k, n, group is None)
    if group is None:
        group = [0] * n if _is_count(k) else list(range(n))
    else:
        if isinstance(group, (Tensor, str, bytes)) or not isinstance(group, Sequence):
            raise TypeError(f"group: expected None or a list of ints (one group index per score tensor), "
                            f"got {type(group).__name__}")
        group = list(group)
        if len(group) != n:
            raise ValueError(f"group: expected one group index per score tensor ({n}), got {len(group)}")
        if any(not _is_count(g) or not 0 <= g < len(ks) for g in group):
            raise ValueError(f"group: expected ints in [0, {len(ks)}) (one k per group), got {group}")
        group = [int(g) for g in group]
    sizes = [0] * len(ks)
    for s, g in zip(scores, group):
        sizes[g] += s.numel()
    for g, (kg, size) in enumerate(zip(ks, sizes)):
        if not 0 <= kg <= size:
            raise ValueError(f"k: expected an int in [0, {size}] for group {g} ({size} scores), got {kg!r}")
    if not isinstance(largest, bool):
        raise TypeError(f"largest: expected a bool, got {type(largest).__name__}")
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend: expected 'triton' or 'cuda', got {backend!r}")
    # Kernels read contiguous memory and reject NaN themselves while they count (no O(n) temporary).
    scores = [s.contiguous() for s in scores]
    return torch.ops.sparse_engine.topk_mask(scores, group, ks, largest, backend)


def _check_k(k, n: int, per_tensor: bool) -> list:
    """``k`` as a list of counts: one int, or one int per tensor (``per_tensor``) or per group."""
    what = "one int per score tensor" if per_tensor else "one int per group"
    if _is_count(k):
        return [k if isinstance(k, torch.SymInt) else int(k)]
    if isinstance(k, Tensor):
        raise TypeError(f"k: expected an int or a list of ints ({what}), got a tensor; pass int(k) (a device "
                        f"tensor's value is read by a synchronisation the caller should see)")
    if isinstance(k, (str, bytes)) or not isinstance(k, Sequence):
        raise TypeError(f"k: expected an int or a list of ints ({what}), got {type(k).__name__} {k!r}")
    ks = list(k)
    if per_tensor and len(ks) != n:
        raise ValueError(f"k: expected an int or one int per score tensor ({n}), got {len(ks)} values")
    for i, kg in enumerate(ks):
        if not _is_count(kg):
            raise TypeError(f"k[{i}]: expected an int, got {type(kg).__name__} {kg!r}")
    return [kg if isinstance(kg, torch.SymInt) else int(kg) for kg in ks]


@torch.library.custom_op("sparse_engine::topk_mask", mutates_args=())
def _topk_mask(scores: list[Tensor], group: list[int], ks: list[int], largest: bool, backend: str) -> list[Tensor]:
    raise NotImplementedError(f"sparse_engine::topk_mask has no kernel for device '{scores[0].device.type}'")


@_topk_mask.register_kernel("cpu")
def _(scores, group, ks, largest, backend):
    return _C.topk_mask(scores, group, ks, largest)


@_topk_mask.register_kernel("cuda")
def _(scores, group, ks, largest, backend):
    if backend == "cuda":
        return _C.topk_mask(scores, group, ks, largest)
    from sparse_engine.kernels.topk_mask import topk_mask_fwd
    return topk_mask_fwd(scores, group, ks, largest)


@_topk_mask.register_fake
def _(scores, group, ks, largest, backend):
    out = []
    for s in scores:
        rows, cols = selection_shape(s.shape)
        out.append(s.new_empty((rows, (cols + WORD_BITS - 1) // WORD_BITS), dtype=torch.int32))
    return out


def topk_mask_ref(scores: Sequence[Tensor], group: Sequence[int], ks: Sequence[int], largest: bool = True
                  ) -> list[Tensor]:
    """Readable reference: per group, concatenate, stable-sort, keep the first k (O(n) memory)."""
    keep = [None] * len(scores)
    for g, kg in enumerate(ks):
        members = [i for i, gi in enumerate(group) if gi == g]
        if not members:
            continue
        flat = torch.cat([scores[i].reshape(-1).float() for i in members])
        flat = flat + 0.0  # -0.0 -> +0.0
        order = torch.sort(flat, descending=largest, stable=True).indices
        chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        chosen[order[:kg]] = True
        for i, part in zip(members, chosen.split([scores[i].numel() for i in members])):
            keep[i] = part
    return [pack_mask_ref(m.reshape(selection_shape(s.shape))) for m, s in zip(keep, scores)]
