"""Bit-packed masks: ``sparse_engine::pack_mask`` and ``sparse_engine::unpack_mask``.

The one mask representation of the library. A weight of any rank >= 2 is viewed as 2-D,
``rows = shape[0]`` and ``cols = numel // rows`` in memory order, and its mask is a contiguous
``int32`` tensor of shape ``(rows, ceil(cols / 32))``: bit ``j`` (LSB first) of word ``w`` in row
``r`` keeps element ``(r, 32 * w + j)``. Padding bits past ``cols`` are zero. One bit per weight
is 1/16 of a bf16 weight.

N:M and block masks are element-wise patterns too, so they use the same bits.
"""
import torch
from torch import Tensor

from sparse_engine import _C

WORD_BITS = 32


def packed_shape(shape) -> tuple[int, int]:
    """Shape ``(rows, words)`` of the packed mask of a weight of shape ``shape`` (rank >= 2)."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"a mask needs a weight of rank >= 2, got shape {shape}")
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, (cols + WORD_BITS - 1) // WORD_BITS


def _as_2d_mask(mask: Tensor) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask: expected a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    if mask.dim() < 2:
        raise ValueError(f"mask: expected rank >= 2 (the weight's shape), got shape {tuple(mask.shape)}")
    return mask.flatten(1)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool mask of a weight's shape (rank >= 2) into ``int32`` words ``(rows, ceil(cols/32))``."""
    return torch.ops.sparse_engine.pack_mask(_as_2d_mask(mask))


def unpack_mask(mask_bits: Tensor, shape) -> Tensor:
    """Unpack ``int32`` mask words into a bool mask of the weight shape ``shape``."""
    shape = tuple(int(s) for s in shape)
    expected = packed_shape(shape)
    if not isinstance(mask_bits, Tensor) or mask_bits.dtype != torch.int32:
        raise TypeError(f"mask_bits: expected an int32 tensor, got "
                        f"{getattr(mask_bits, 'dtype', type(mask_bits).__name__)}")
    if tuple(mask_bits.shape) != expected:
        raise ValueError(f"mask_bits: expected shape {expected} for a weight of shape {shape}, "
                         f"got {tuple(mask_bits.shape)}")
    cols = 1
    for s in shape[1:]:
        cols *= s
    return torch.ops.sparse_engine.unpack_mask(mask_bits, cols).reshape(shape)


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
    shape = tuple(shape)
    rows, words = mask_bits.shape
    cols = 1
    for s in shape[1:]:
        cols *= s
    shifts = torch.arange(WORD_BITS, device=mask_bits.device, dtype=torch.int64)
    bits = (mask_bits.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(rows, words * WORD_BITS)[:, :cols].to(torch.bool).reshape(shape)
