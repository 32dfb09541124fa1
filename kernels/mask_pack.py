"""Triton kernels that pack a boolean keep-mask into int32 bit words, unpack it again, and apply
it: in place (zero the pruned elements of a tensor) or as a masked copy (``t * M``).

Format (the one mask representation of sparse_engine): ``mask_bits`` is an int32 tensor of shape
(rows, ceil(cols/32)); bit j (LSB = 0) of word w in row r is the keep-flag of element (r, 32*w + j).
Padding bits past ``cols`` are 0.

Each program handles a tile of BLOCK_R rows x BLOCK_W words, addressed as a 3-D
[BLOCK_R, BLOCK_W, 32] block of mask elements, so neither direction needs a reshape.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# 16 rows x 8 words = 4096 flags a program: each row segment is 256 contiguous bytes, enough for
# coalesced loads, while small masks still spread over many programs.
_BLOCK_R = 16
_BLOCK_W = 8


@triton.jit
def _pack_mask_kernel(
    mask_ptr, bits_ptr,
    R, C, W,
    stride_mr, stride_mc,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # One flat grid: a 2-D grid caps axis 1 at 65535 programs.
    pid = tl.program_id(0)
    num_pid_w = tl.cdiv(W, BLOCK_W)
    pid_r = pid // num_pid_w
    pid_w = pid % num_pid_w

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_j = tl.arange(0, 32)
    rows = offs_r[:, None, None]
    cols = offs_w[None, :, None] * 32 + offs_j[None, None, :]

    flags = tl.load(
        mask_ptr + rows.to(tl.int64) * stride_mr + cols.to(tl.int64) * stride_mc,
        mask=(rows < R) & (cols < C), other=0,
    )
    # The 32 terms are distinct powers of two, so their sum is their bitwise OR; 1 << 31 is the int32
    # sign bit and the int32 sum wraps onto it. tl.sum rather than an OR reduce: the interpreter runs
    # custom combine functions element by element, far slower than a numpy sum.
    shifted = (flags != 0).to(tl.int32) << offs_j[None, None, :]
    words = tl.sum(shifted, 2)

    out = bits_ptr + offs_r[:, None].to(tl.int64) * W + offs_w[None, :]
    tl.store(out, words, mask=(offs_r[:, None] < R) & (offs_w[None, :] < W))


@triton.jit
def _tile_flags(bits_ptr, R, C, W, stride_br, stride_bw, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's tile of BLOCK_R rows x BLOCK_W words: its keep-flags as a [BLOCK_R, BLOCK_W, 32]
    block of 0/1, the element rows and columns, and which elements lie inside the (R, C) tensor."""
    pid = tl.program_id(0)
    num_pid_w = tl.cdiv(W, BLOCK_W)
    pid_r = pid // num_pid_w
    pid_w = pid % num_pid_w

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_j = tl.arange(0, 32)

    words = tl.load(
        bits_ptr + offs_r[:, None].to(tl.int64) * stride_br + offs_w[None, :] * stride_bw,
        mask=(offs_r[:, None] < R) & (offs_w[None, :] < W), other=0,
    )
    # Arithmetic shift of a negative word smears the sign bit leftwards, but & 1 keeps only bit j.
    flags = (words[:, :, None] >> offs_j[None, None, :]) & 1

    rows = offs_r[:, None, None]
    cols = offs_w[None, :, None] * 32 + offs_j[None, None, :]
    return flags, rows, cols, (rows < R) & (cols < C)


@triton.jit
def _unpack_mask_kernel(
    bits_ptr, mask_ptr,
    R, C, W,
    stride_br, stride_bw,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    flags, rows, cols, inside = _tile_flags(bits_ptr, R, C, W, stride_br, stride_bw, BLOCK_R, BLOCK_W)
    tl.store(mask_ptr + rows.to(tl.int64) * C + cols, flags.to(tl.uint8), mask=inside)


@triton.jit
def _apply_mask_kernel(
    t_ptr, bits_ptr,
    R, C, W,
    stride_tr, stride_tc,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    flags, rows, cols, inside = _tile_flags(bits_ptr, R, C, W, W, 1, BLOCK_R, BLOCK_W)
    # A store only: kept elements are never read or written.
    ptrs = t_ptr + rows.to(tl.int64) * stride_tr + cols.to(tl.int64) * stride_tc
    zeros = tl.zeros([BLOCK_R, BLOCK_W, 32], dtype=t_ptr.dtype.element_ty)
    tl.store(ptrs, zeros, mask=(flags == 0) & inside)


@triton.jit
def _masked_copy_kernel(
    t_ptr, bits_ptr, out_ptr,
    R, C, W,
    stride_tr, stride_tc,
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    flags, rows, cols, inside = _tile_flags(bits_ptr, R, C, W, W, 1, BLOCK_R, BLOCK_W)
    # Pruned elements are not read: `other` is the zero they become (NaN or inf there cannot leak).
    values = tl.load(t_ptr + rows.to(tl.int64) * stride_tr + cols.to(tl.int64) * stride_tc,
                     mask=(flags != 0) & inside, other=0)
    tl.store(out_ptr + rows.to(tl.int64) * C + cols, values, mask=inside)


def _on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the one holding the tensors.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_device(name: str, t: torch.Tensor) -> None:
    # The interpreter runs on CPU tensors; compiled Triton needs CUDA memory.
    if not _INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on '{t.device}'")


def pack_mask_fwd(mask: torch.Tensor) -> torch.Tensor:
    """Pack a keep-mask into bit words.

    mask: bool or uint8 (nonzero = kept), shape (R, C), any strides.
    Returns a new contiguous int32 tensor of shape (R, ceil(C/32)), padding bits 0.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask: expected a 2-D tensor (rows, cols), got shape {tuple(mask.shape)}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"mask: expected dtype torch.bool or torch.uint8, got {mask.dtype}")
    _check_device("mask", mask)
    R, C = mask.shape
    W = triton.cdiv(C, 32)
    bits = torch.empty((R, W), dtype=torch.int32, device=mask.device)
    if bits.numel() == 0:
        return bits
    # bool and uint8 share a byte layout; a uint8 view keeps the strides and sidesteps i1 pointers.
    flags = mask.view(torch.uint8)
    grid = (triton.cdiv(R, _BLOCK_R) * triton.cdiv(W, _BLOCK_W),)
    with _on_device_of(mask):
        _pack_mask_kernel[grid](
            flags, bits, R, C, W, flags.stride(0), flags.stride(1),
            BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W,
        )
    return bits


def unpack_mask_fwd(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Unpack bit words into a keep-mask.

    bits: int32, shape (R, ceil(cols/32)), any strides; padding bits are ignored.
    Returns a new contiguous bool tensor of shape (R, cols).
    """
    if bits.dim() != 2 or bits.dtype != torch.int32:
        raise ValueError(f"bits: expected a 2-D torch.int32 tensor, got {bits.dtype} of shape {tuple(bits.shape)}")
    if cols < 0:
        raise ValueError(f"cols: expected a non-negative int, got {cols}")
    R, W = bits.shape
    if W != triton.cdiv(cols, 32):
        raise ValueError(
            f"bits: expected {triton.cdiv(cols, 32)} words a row (ceil(cols/32) for cols={cols}), got {W}"
        )
    _check_device("bits", bits)
    mask = torch.empty((R, cols), dtype=torch.bool, device=bits.device)
    if mask.numel() == 0:
        return mask
    grid = (triton.cdiv(R, _BLOCK_R) * triton.cdiv(W, _BLOCK_W),)
    with _on_device_of(bits):
        _unpack_mask_kernel[grid](
            bits, mask.view(torch.uint8), R, cols, W, bits.stride(0), bits.stride(1),
            BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W,
        )
    return mask


def _check_elementwise(t: torch.Tensor, bits: torch.Tensor) -> tuple[int, int, int]:
    """Checks of the element-wise launchers; returns (R, C, W)."""
    if t.dim() != 2:
        raise ValueError(f"t: expected a 2-D tensor (rows, cols), got shape {tuple(t.shape)}")
    R, C = t.shape
    W = triton.cdiv(C, 32)
    if bits.dtype != torch.int32 or tuple(bits.shape) != (R, W) or not bits.is_contiguous():
        raise ValueError(f"bits: expected a contiguous torch.int32 tensor of shape {(R, W)}, "
                         f"got {bits.dtype} of shape {tuple(bits.shape)}")
    _check_device("t", t)
    return R, C, W


def apply_mask_fwd(t: torch.Tensor, bits: torch.Tensor) -> None:
    """Set the pruned elements of ``t`` to zero in place (kept elements are not touched).

    t: (R, C), any dtype of 1-8 bytes, any strides. bits: contiguous int32 (R, ceil(C/32)).
    """
    R, C, W = _check_elementwise(t, bits)
    if t.numel() == 0:
        return
    grid = (triton.cdiv(R, _BLOCK_R) * triton.cdiv(W, _BLOCK_W),)
    # bool has no Triton pointer type the interpreter stores to; a uint8 view shares its bytes.
    data = t.view(torch.uint8) if t.dtype == torch.bool else t
    with _on_device_of(t):
        _apply_mask_kernel[grid](
            data, bits, R, C, W, data.stride(0), data.stride(1),
            BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W,
        )


def masked_copy_fwd(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``t * M`` as a new contiguous tensor: kept elements copied, pruned ones zero (never read).

    t: (R, C), float dtypes, any strides. bits: contiguous int32 (R, ceil(C/32)).
    """
    R, C, W = _check_elementwise(t, bits)
    out = torch.empty((R, C), dtype=t.dtype, device=t.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(R, _BLOCK_R) * triton.cdiv(W, _BLOCK_W),)
    with _on_device_of(t):
        _masked_copy_kernel[grid](
            t, bits, out, R, C, W, t.stride(0), t.stride(1),
            BLOCK_R=_BLOCK_R, BLOCK_W=_BLOCK_W,
        )
    return out
