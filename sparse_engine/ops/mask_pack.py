"""Bit-packed masks: ``sparse_engine::pack_mask`` and ``sparse_engine::unpack_mask``.

The one mask representation of the library. A tensor of any rank is viewed as 2-D in memory
order (``selection_shape``): rank >= 2 as ``rows = shape[0]``, ``cols = prod(shape[1:])``; rank 0
and 1 as one row, ``(1, numel)``. Its mask is a contiguous ``int32`` tensor of shape
``(rows, ceil(cols / 32))``: bit ``j`` (LSB first) of word ``w`` in row ``r`` keeps element
``(r, 32 * w + j)``. Padding bits past ``cols`` are zero. One bit per weight is 1/16 of a bf16
weight. ``topk_mask`` returns masks in this form for scores of any rank, so every mask it returns
unpacks with its tensor's own shape.

N:M and block masks are element-wise patterns too, so they use the same bits.
"""
import numbers

import torch
from torch import Tensor

from sparse_engine import _C

WORD_BITS = 32


def _shape(shape, argname: str = "shape") -> tuple[int, ...]:
    if type(shape) is torch.Size:  # a tensor's own shape: valid by construction (the per-call path)
        return tuple(shape)
    if isinstance(shape, Tensor) or isinstance(shape, (str, bytes)):
        raise TypeError(f"{argname}: expected a sequence of ints (a tensor's .shape), got {type(shape).__name__}")
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{argname}: expected a sequence of ints (a tensor's .shape), got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (numbers.Integral, torch.SymInt)) or d < 0:
            raise ValueError(f"{argname}: expected non-negative ints, got {dims}")
    return tuple(d if isinstance(d, torch.SymInt) else int(d) for d in dims)


def selection_shape(shape) -> tuple[int, int]:
    """The 2-D view ``(rows, cols)`` of a tensor of shape ``shape`` that its packed mask packs:
    ``(shape[0], prod(shape[1:]))`` for rank >= 2, ``(1, numel)`` for rank 0 and 1."""
    shape = _shape(shape)
    if len(shape) < 2:
        return 1, (shape[0] if shape else 1)
    cols = 1
    for s in shape[1:]:
        cols *= s
    return shape[0], cols


def packed_shape(shape) -> tuple[int, int]:
    """Shape ``(rows, words)`` of the packed mask of a tensor of shape ``shape`` (any rank)."""
    rows, cols = selection_shape(shape)
    return rows, (cols + WORD_BITS - 1) // WORD_BITS


def _as_2d_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    return mask.reshape(selection_shape(mask.shape))


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask of any rank into ``int32`` words ``(rows, ceil(cols/32))`` (module docstring)."""
    return torch.ops.sparse_engine.pack_mask(_as_2d_mask(mask))


def _check_mask_bits(mask_bits: Tensor, shape: tuple) -> None:
    if not isinstance(mask_bits, Tensor) or mask_bits.dtype != torch.int32:
        raise TypeError(f"mask_bits: expected an int32 tensor, got "
                        f"{getattr(mask_bits, 'dtype', type(mask_bits).__name__)}")
    expected = packed_shape(shape)
    if tuple(mask_bits.shape) != expected:
        raise ValueError(f"mask_bits: expected shape {expected} for a tensor of shape {shape}, "
                         f"got {tuple(mask_bits.shape)}")


def unpack_mask(mask_bits: Tensor, shape) -> Tensor:
    """Unpack ``int32`` mask words into a bool mask of shape ``shape`` (any rank, 0-d included)."""
    shape = _shape(shape)
    _check_mask_bits(mask_bits, shape)
    return torch.ops.sparse_engine.unpack_mask(mask_bits, selection_shape(shape)[1]).reshape(shape)


def apply_mask_(t: Tensor, mask_bits: Tensor) -> Tensor:
    """Set the pruned elements of ``t`` (any rank, any real dtype) to zero in place, reading the
    packed mask directly: no bool mask is built. Kept elements are not read or written. Returns ``t``.

    Args:
        t: a tensor whose packed mask shape is ``packed_shape(t.shape)`` (a weight, its gradient, or
            an optimizer state tensor shaped like it).
        mask_bits: ``int32 packed_shape(t.shape)`` on ``t``'s device.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"t: expected a real dtype, got {t.dtype}")
    _check_mask_bits(mask_bits, tuple(t.shape))
    if mask_bits.device != t.device:
        raise ValueError(f"mask_bits: expected a tensor on {t.device} (t's device), got {mask_bits.device}")
    rows, cols = selection_shape(t.shape)
    try:
        view = t.view(rows, cols)
    except RuntimeError:  # strides that no 2-D view covers (e.g. a channels-last 4-D weight)
        return t.masked_fill_(~unpack_mask(mask_bits, t.shape), 0)
    torch.ops.sparse_engine.apply_mask_(view, mask_bits.contiguous())
    return t


def apply_mask_ref(t: Tensor, mask_bits: Tensor) -> Tensor:
    """Plain-torch reference of :func:`apply_mask_`: ``t.masked_fill_(~M, 0)``."""
    return t.masked_fill_(~unpack_mask_ref(mask_bits, t.shape), 0)


@torch.library.custom_op("sparse_engine::pack_mask", mutates_args=())
def _pack_mask(mask: Tensor) -> Tensor:
    raise NotImplementedError(f"sparse_engine::pack_mask has no kernel for device '{mask.device.type}'")


@_pack_mask.register_kernel("cpu")
def _pack_mask_cpu(mask):
    return _C.pack_mask(mask)


@_pack_mask.register_kernel("cuda")
def _pack_mask_cuda(mask):
    from sparse_engine.kernels.mask_pack import pack_mask_fwd
    return pack_mask_fwd(mask)


@_pack_mask.register_fake
def _(mask):
    rows, cols = mask.shape
    return mask.new_empty((rows, (cols + WORD_BITS - 1) // WORD_BITS), dtype=torch.int32)


@torch.library.custom_op("sparse_engine::unpack_mask", mutates_args=())
def _unpack_mask(mask_bits: Tensor, cols: int) -> Tensor:
    raise NotImplementedError(f"sparse_engine::unpack_mask has no kernel for device '{mask_bits.device.type}'")


@_unpack_mask.register_kernel("cpu")
def _unpack_mask_cpu(mask_bits, cols):
    return _C.unpack_mask(mask_bits, cols)


@_unpack_mask.register_kernel("cuda")
def _unpack_mask_cuda(mask_bits, cols):
    from sparse_engine.kernels.mask_pack import unpack_mask_fwd
    return unpack_mask_fwd(mask_bits, cols)


@_unpack_mask.register_fake
def _(mask_bits, cols):
    return mask_bits.new_empty((mask_bits.shape[0], cols), dtype=torch.bool)


def pack_mask_ref(mask: Tensor) -> Tensor:
    """Plain-torch reference of :func:`pack_mask`."""
    m = _as_2d_mask(mask)
    rows, cols = m.shape
    words = (cols + WORD_BITS - 1) // WORD_BITS
    padded = torch.zeros(rows, words * WORD_BITS, dtype=torch.int64, device=m.device)
    padded[:, :cols] = m.to(torch.int64)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=m.device) << torch.arange(
        WORD_BITS, device=m.device)
    packed = (padded.view(rows, words, WORD_BITS) * weights).sum(-1)
    # Reinterpret the unsigned 32-bit value as a signed int32 word.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_mask_ref(mask_bits: Tensor, shape) -> Tensor:
    """Plain-torch reference of :func:`unpack_mask`."""
    shape = _shape(shape)
    _check_mask_bits(mask_bits, shape)
    rows, words = mask_bits.shape
    cols = selection_shape(shape)[1]
    shifts = torch.arange(WORD_BITS, device=mask_bits.device, dtype=torch.int64)
    bits = (mask_bits.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, words * WORD_BITS)[:, :cols].to(torch.bool).reshape(shape)


@torch.library.custom_op("sparse_engine::apply_mask_", mutates_args=("t",))
def _apply_mask(t: Tensor, mask_bits: Tensor) -> None:
    raise NotImplementedError(f"sparse_engine::apply_mask_ has no kernel for device '{t.device.type}'")


@_apply_mask.register_kernel("cpu")
def _apply_mask_cpu(t, mask_bits):
    _C.apply_mask_(t, mask_bits)


@_apply_mask.register_kernel("cuda")
def _apply_mask_cuda(t, mask_bits):
    from sparse_engine.kernels.mask_pack import apply_mask_fwd
    apply_mask_fwd(t, mask_bits)


@_apply_mask.register_fake
def _(t, mask_bits):
    return None
