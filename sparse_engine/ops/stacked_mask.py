"""Masks of S stacked models: the per-model bit-packed layout of ``mask_pack``, with a model axis in front.

A stacked weight ``(S, R, ...)`` holds S weights of shape ``(R, ...)``. Its mask is
``int32 (S, R, ceil(prod(...)/32))``: model ``s``'s slice ``[s]`` is exactly the packed mask that
``pack_mask`` gives for that model's weight alone, so masks move between a stack and its models
by indexing, with no repacking. (Packing the stacked tensor as one rank-3 tensor would give rows
of ``R * prod(...)`` bits instead: a different layout.)
"""
import torch
from torch import Tensor

from sparse_engine import _C
from sparse_engine.ops.masked_weight import masked_weight_for_op  # also registers the op's fake and CUDA kernels
from sparse_engine.ops.mask_pack import pack_mask, packed_shape, unpack_mask, unpack_mask_ref


def stacked_packed_shape(shape) -> tuple[int, int, int]:
    """``(S, rows, words)``: shape of the stacked mask of a stacked weight of shape ``(S, rows, ...)``."""
    shape = tuple(shape)
    if len(shape) < 3:
        raise ValueError(f"shape: expected a stacked weight shape (S, rows, ...) of rank >= 3, got {shape}")
    return (shape[0],) + packed_shape(shape[1:])


def pack_stacked_mask(mask: Tensor) -> Tensor:
    """Bool mask ``(S, rows, ...)`` -> ``int32 (S, rows, words)``, one ``pack_mask`` layout per model."""
    if not isinstance(mask, Tensor) or mask.dim() < 3:
        raise ValueError(f"mask: expected a bool tensor (S, rows, ...) of rank >= 3, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    s, rows = mask.shape[:2]
    return pack_mask(mask.reshape(s * rows, -1)).reshape(stacked_packed_shape(mask.shape))


def unpack_stacked_mask(mask_bits: Tensor, shape) -> Tensor:
    """``int32 (S, rows, words)`` -> bool mask of the stacked weight's shape ``(S, rows, ...)``."""
    shape = tuple(shape)
    check_stacked_mask_bits(mask_bits, shape)
    s, rows = shape[:2]
    return unpack_mask(mask_bits.reshape(s * rows, -1), (s * rows,) + shape[2:]).reshape(shape)


def unpack_stacked_mask_ref(mask_bits: Tensor, shape) -> Tensor:
    """Plain-torch reference of :func:`unpack_stacked_mask`: each model's mask unpacked on its own."""
    return torch.stack([unpack_mask_ref(mask_bits[i], tuple(shape)[1:]) for i in range(shape[0])])


def apply_stacked_mask(t: Tensor, mask_bits: Tensor) -> Tensor:
    """``t`` with **exact zeros** where the stacked mask is 0 (a new contiguous tensor; ``t (S, rows, ...)``,
    any float dtype).

    Model s's rows of ``t`` and of the mask are rows ``s * rows + r`` of a ``(S * rows, ...)`` tensor
    and of its ``pack_mask`` layout, so this is one call of the ``sparse_engine::masked_weight`` op
    on those views: one pass straight from the packed bits, keeping the kept bits (NaN and inf
    included, where ``t * mask`` would give NaN) and writing +0 elsewhere.
    """
    s, rows = t.shape[:2]
    flat = t.reshape(s * rows, *t.shape[2:])
    return torch.ops.sparse_engine.masked_weight(flat, mask_bits.reshape(s * rows, -1)).view(t.shape)


def stacked_masked_weight_for_op(t: Tensor, mask_bits: Tensor) -> Tensor:
    """``masked_weight_for_op`` of a stacked weight ``(S, rows, ...)``, in its shape: for a torch op that reads it
    and keeps no alias (differentiable, exact-zero gradients at pruned entries; ``t`` itself on the CPU where
    its pruned entries are zeros). Model s's rows are rows ``s * rows + r`` of the packed layout."""
    return masked_weight_for_op(t.flatten(0, 1), mask_bits.flatten(0, 1)).view(t.shape)


def stacked_weight_to_read(t: Tensor, mask_bits: Tensor) -> Tensor:
    """For the CPU kernels of the stacked ops, which read the masked weight and return no alias of
    it: ``t`` itself when a read-only pass finds its pruned entries already zeros (what the stacked
    optimizers keep), so the copy is skipped; otherwise :func:`apply_stacked_mask`."""
    s, rows = t.shape[:2]
    if _C.pruned_are_zero(t.reshape(s * rows, -1), mask_bits.reshape(s * rows, -1)):
        return t
    return apply_stacked_mask(t, mask_bits)


def mask_stacked_grad_(t: Tensor, mask_bits: Tensor) -> Tensor:
    """For the CPU kernels of the stacked ops: ``t`` (a fresh weight gradient) with exact zeros where
    the stacked mask is 0, in place when ``t`` is contiguous, else as :func:`apply_stacked_mask`."""
    if not t.is_contiguous():
        return apply_stacked_mask(t, mask_bits)
    s, rows = t.shape[:2]
    _C.apply_mask_(t.view(s * rows, -1), mask_bits.reshape(s * rows, -1).contiguous())
    return t


def check_stacked_mask_bits(mask_bits: Tensor, shape) -> None:
    if not isinstance(mask_bits, Tensor):
        raise TypeError(f"mask_bits: expected a torch.Tensor, got {type(mask_bits).__name__}")
    if mask_bits.dtype != torch.int32:
        raise TypeError(f"mask_bits: expected dtype torch.int32 (see pack_stacked_mask), got {mask_bits.dtype}")
    expected = stacked_packed_shape(shape)
    if tuple(mask_bits.shape) != expected:
        raise ValueError(f"mask_bits: expected shape {expected} for a stacked weight of shape {tuple(shape)}, "
                         f"got {tuple(mask_bits.shape)}")
