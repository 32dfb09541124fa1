"""Triton implicit-GEMM kernels for conv2d with a bit-packed weight mask.

Every kernel gathers its GEMM operands from x / dy by index arithmetic (no im2col buffer) and
applies the mask to weight tiles in registers, so W*M never exists in memory. The weight is viewed
as (Co, C/groups*KH*KW) in memory order (ci, kh, kw); `mask_bits` is (Co, ceil(that/32)) int32,
bit j of word w of row r keeping element (r, 32*w + j).

Stacked models (``stacked_masked_conv2d_*``): S models' convolutions in one launch. Their weights
and masks are rows of one (S*Co, ...) matrix, so a model's group is one more group of the grid axis
(S * groups programs along z); x and y get a model stride, and a program's channels are those of its
group within its model. The single-model launchers are the case S = 1.

GEMM shapes, per group (groups are a grid axis):
  forward    y  : M = Nb*OH*OW,  N = Co/g,           K = C/g*KH*KW
  bwd_input  dx : M = Nb*H*W,    N = C/g,            K = Co/g*KH*KW
  bwd_weight dw : M = Co/g,      N = C/g*KH*KW,      reduction over Nb*OH*OW (split across a grid axis)
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from sparse_engine.kernels.arch import device_arch, smem_limit

__all__ = ["masked_conv2d_fwd", "masked_conv2d_bwd_input", "masked_conv2d_bwd_weight", "stacked_masked_conv2d_fwd",
           "stacked_masked_conv2d_bwd_input", "stacked_masked_conv2d_bwd_weight"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _config(tiles, num_warps, num_stages):
    return triton.Config(dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tiles)), num_warps=num_warps,
                         num_stages=num_stages)


# Tile configs ((BLOCK_M, BLOCK_N, BLOCK_K), num_warps, num_stages), spill-free by ptxas -v on sm_90a
# and sm_80 (kernels/aot.py), not yet timed on a GPU. The gather arithmetic is per element, so
# registers grow with tile size and pipeline depth: beyond 64x64 the tiles get 8 warps, and
# 128x128 spills in every kernel. Tensor cores (fp16, bf16, TF32):
_TILES = [((128, 64, 32), 8, 3), ((64, 128, 32), 8, 3), ((64, 64, 64), 8, 3), ((64, 64, 32), 4, 4),
          ((64, 32, 32), 4, 4), ((64, 64, 32), 8, 2), ((32, 64, 32), 4, 2)]
# The input gradient decodes a stride test per element as well: deeper pipelines spill there.
_BWD_INPUT_TILES = [((128, 64, 32), 8, 3), ((128, 64, 32), 8, 2), ((64, 128, 32), 8, 2), ((64, 64, 32), 8, 2),
                    ((32, 64, 32), 4, 2)]
# IEEE fp32 (allow_tf32 off): the dot runs on FMA units and its operands take BLOCK_K registers a
# row a thread owns, on top of the gather arithmetic: every tile above spills. 16-wide K slices
# and shallow pipelines fit.
_FP32_TILES = [((64, 64, 16), 8, 2), ((64, 32, 16), 4, 2), ((32, 64, 16), 4, 2), ((32, 32, 16), 4, 3)]
_MMA = {"fwd": [_config(*t) for t in _TILES], "bwd_input": [_config(*t) for t in _BWD_INPUT_TILES],
        "bwd_weight": [_config(*t) for t in _TILES]}
_FP32 = {name: [_config(*t) for t in _FP32_TILES] for name in ("fwd", "bwd_input", "bwd_weight")}
# With fp32 operands (TF32) a few of the tensor-core tiles spill, per architecture (90: sm_90 and
# newer, 80: older) and kernel. Keys: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
_TF32_SPILLS = {
    90: {"bwd_weight": {(64, 64, 64, 8, 3), (64, 64, 32, 4, 4)}},
    80: {"fwd": {(64, 64, 64, 8, 3)}, "bwd_input": {(128, 64, 32, 8, 3)}},
}
_SMEM_MARGIN = 16 * 1024


def _key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages


def reachable_configs(kernel, dtype, allow_tf32, arch, smem=None):
    """The configs kernel ("fwd", "bwd_input", "bwd_weight") may launch with for `dtype` on a GPU of
    capability `arch` (major*10 + minor) with `smem` bytes of shared memory a block (default: the
    architecture's)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.float32 and not allow_tf32:
        configs = _FP32[kernel]
    else:
        spills = _TF32_SPILLS[90 if arch >= 90 else 80].get(kernel, set()) if dtype == torch.float32 else set()
        configs = [c for c in _MMA[kernel] if _key(c) not in spills]
    budget = (smem_limit(arch) if smem is None else smem) - _SMEM_MARGIN
    itemsize = torch.empty((), dtype=dtype).element_size()
    return [c for c in configs
            if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize <= budget]


def _all_configs(kernel, interpreter_config):
    # The interpreter cannot time kernels, and tiny test shapes want small tiles: one fixed config
    # (a single-config autotuner launches without benchmarking).
    if _interpreting():
        return [triton.Config(interpreter_config, num_warps=1, num_stages=1)]
    configs = {}
    for c in _MMA[kernel] + _FP32[kernel]:
        configs.setdefault(_key(c), c)
    return list(configs.values())


def _pruner(kernel, operand):
    """early_config_prune: the configs reachable for the operand's dtype and device."""
    def prune(configs, named_args, **kwargs):
        if _interpreting():
            return configs
        t = named_args[operand]
        arch, smem = device_arch(t.device)
        fits = reachable_configs(kernel, t.dtype, kwargs["DOT_PRECISION"] == "tf32", arch, smem)
        if not fits:
            raise ValueError(f"{operand.removesuffix('_ptr')}: no {kernel} config fits {smem} B of shared memory "
                             f"(sm_{arch}) for {t.dtype}")
        return fits
    return prune


@triton.jit
def _mask_keep(bits_ptr, bits_stride, row, col, ok):
    """Keep-flags (int1) of weight elements (row, col) where `ok`, False elsewhere."""
    words = tl.load(bits_ptr + row * bits_stride + (col >> 5), mask=ok, other=0)
    return ((words >> (col & 31)) & 1) != 0


@triton.autotune(configs=_all_configs("fwd", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}),
                 key=["M_BUCKET", "Cg", "Cog", "KH", "KW"],
                 prune_configs_by={"early_config_prune": _pruner("fwd", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_conv2d_fwd_kernel(
    x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr,
    Nb, H, W, OH, OW, Cg, Cog, M_BUCKET,
    sxs, sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    sys, syn, syc, syh, syw,
    bits_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)  # the group among all models' (S * G): its weight rows start at g * Cog
    model = g // G
    gm = g % G  # the group within its model: its channels of x and y
    # The model's x and y, as scalar base pointers: the per-element offsets stay as for one model.
    x_ptr += model.to(tl.int64) * sxs
    y_ptr += model.to(tl.int64) * sys
    M = Nb * OH * OW
    K = Cg * KH * KW

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = rm // (OH * OW)
    p = rm % (OH * OW)
    oh = p // OW
    ow = p % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    # int64 offsets: n * sxn passes 2**31 on large activations, and ci * sxc, ih0 * sxh on large
    # images. The 1-D terms are widened before they multiply; 2-D tiles only add them.
    x_row = n.to(tl.int64) * sxn + (gm * Cg).to(tl.int64) * sxc + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < Cog
    co = g * Cog + rn
    w_col = co.to(tl.int64) * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        ci = rk // (KH * KW)
        kh = (rk % (KH * KW)) // KW
        kw = rk % KW
        ih = ih0[:, None] + (kh * dil_h)[None, :]
        iw = iw0[:, None] + (kw * dil_w)[None, :]
        a_ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_col = ci.to(tl.int64) * sxc + (kh * dil_h).to(tl.int64) * sxh + (kw * dil_w).to(tl.int64) * sxw
        a = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=a_ok, other=0.0)

        b_ok = k_ok[:, None] & n_ok[None, :]
        w_k = ci * swi + kh * swh + kw * sww
        w = tl.load(w_ptr + w_col[None, :] + w_k[:, None], mask=b_ok, other=0.0)
        keep = _mask_keep(bits_ptr, bits_stride, co[None, :], rk[:, None], b_ok)
        w = tl.where(keep, w, tl.zeros_like(w))
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_off = (n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] \
        + ((gm * Cog + rn).to(tl.int64) * syc)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_all_configs("bwd_input", {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32}),
                 key=["M_BUCKET", "Cg", "Cog", "KH", "KW", "SH", "SW"],
                 prune_configs_by={"early_config_prune": _pruner("bwd_input", "dy_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_conv2d_bwd_input_kernel(
    dy_ptr, w_ptr, bits_ptr, dx_ptr,
    Nb, H, W, OH, OW, Cg, Cog, M_BUCKET,
    sds, sdn, sdc, sdh, sdw,
    swo, swi, swh, sww,
    sxs, sxn, sxc, sxh, sxw,
    bits_stride,
    pad_h, pad_w, dil_h, dil_w,
    SH: tl.constexpr, SW: tl.constexpr,
    G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)  # among all models' groups, as in the forward
    model = g // G
    gm = g % G
    dy_ptr += model.to(tl.int64) * sds  # the model's dy and dx, as in the forward
    dx_ptr += model.to(tl.int64) * sxs
    M = Nb * H * W
    K = Cog * KH * KW

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    n = rm // (H * W)
    p = rm % (H * W)
    ih = p // W
    iw = p % W
    dy_row = n.to(tl.int64) * sdn + (gm * Cog).to(tl.int64) * sdc

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < Cg
    ci = rn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        co = rk // (KH * KW)
        kh = (rk % (KH * KW)) // KW
        kw = rk % KW
        # Output pixel oh feeds ih through tap kh iff oh*SH - pad + kh*dil == ih; the test on
        # t >= 0 comes first so that C (GPU) and floor (interpreter) division agree.
        th = ih[:, None] + pad_h - (kh * dil_h)[None, :]
        tw = iw[:, None] + pad_w - (kw * dil_w)[None, :]
        oh = th // SH
        ow = tw // SW
        a_ok = (m_ok[:, None] & k_ok[None, :] & (th >= 0) & (tw >= 0) & (th % SH == 0) & (tw % SW == 0)
                & (oh < OH) & (ow < OW))
        # oh * sdh + ow * sdw stays int32 (2-D, and registers are what limits this kernel): the
        # launcher checks that one image of dy spans less than 2**30 elements.
        a = tl.load(dy_ptr + dy_row[:, None] + (co.to(tl.int64) * sdc)[None, :] + (oh * sdh + ow * sdw),
                    mask=a_ok, other=0.0)

        b_ok = k_ok[:, None] & n_ok[None, :]
        co_g = g * Cog + co
        w_k = co_g.to(tl.int64) * swo + kh * swh + kw * sww
        w = tl.load(w_ptr + w_k[:, None] + (ci * swi)[None, :], mask=b_ok, other=0.0)
        col = ci[None, :] * (KH * KW) + (kh * KW + kw)[:, None]
        keep = _mask_keep(bits_ptr, bits_stride, co_g[:, None], col, b_ok)
        w = tl.where(keep, w, tl.zeros_like(w))
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    dx_off = (n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] \
        + ((gm * Cg + ci).to(tl.int64) * sxc)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.autotune(configs=_all_configs("bwd_weight", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
                 key=["M_BUCKET", "Cg", "Cog", "KH", "KW", "n_split"],
                 prune_configs_by={"early_config_prune": _pruner("bwd_weight", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_conv2d_bwd_weight_kernel(
    dy_ptr, x_ptr, bits_ptr, out_ptr,
    Nb, H, W, OH, OW, Cg, Cog, M_BUCKET,
    sds, sdn, sdc, sdh, sdw,
    sxs, sxn, sxc, sxh, sxw,
    son, sor, soc,
    bits_stride,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    n_split, split_len,
    G: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2) // n_split  # among all models' groups, as in the forward
    split = tl.program_id(2) % n_split
    model = g // G
    gm = g % G
    dy_ptr += model.to(tl.int64) * sds  # the model's dy and x, as in the forward
    x_ptr += model.to(tl.int64) * sxs
    R = Nb * OH * OW
    Kc = Cg * KH * KW

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < Cog
    co = g * Cog + rm
    dy_col = (gm * Cog + rm).to(tl.int64) * sdc

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < Kc
    ci = rn // (KH * KW)
    kh = (rn % (KH * KW)) // KW
    kw = rn % KW
    x_col = (gm * Cg + ci).to(tl.int64) * sxc + (kh * dil_h).to(tl.int64) * sxh + (kw * dil_w).to(tl.int64) * sxw

    r_start = split * split_len
    r_end = tl.minimum(r_start + split_len, R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        r_ok = rr < r_end
        nb = rr // (OH * OW)
        p = rr % (OH * OW)
        oh = p // OW
        ow = p % OW
        a_ok = m_ok[:, None] & r_ok[None, :]
        dy_row = nb.to(tl.int64) * sdn + oh.to(tl.int64) * sdh + ow.to(tl.int64) * sdw
        a = tl.load(dy_ptr + dy_col[:, None] + dy_row[None, :], mask=a_ok, other=0.0)

        ih0 = oh * stride_h - pad_h
        iw0 = ow * stride_w - pad_w
        ih = ih0[:, None] + (kh * dil_h)[None, :]
        iw = iw0[:, None] + (kw * dil_w)[None, :]
        b_ok = r_ok[:, None] & n_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = nb.to(tl.int64) * sxn + ih0.to(tl.int64) * sxh + iw0.to(tl.int64) * sxw
        b = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=b_ok, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    out_ok = m_ok[:, None] & n_ok[None, :]
    keep = _mask_keep(bits_ptr, bits_stride, co[:, None], rn[None, :], out_ok)
    acc = tl.where(keep, acc, tl.zeros_like(acc))
    out_off = split.to(tl.int64) * son + co.to(tl.int64)[:, None] * sor + rn[None, :] * soc
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _pair(name, value, minimum):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum} in both dimensions, got {tuple(value)}")
    return tuple(value)


def _shape4(name, value):
    if (not isinstance(value, (tuple, list, torch.Size)) or len(value) != 4
            or not all(isinstance(v, int) and v >= 0 for v in value)):
        raise ValueError(f"{name} must be 4 non-negative ints, got {value!r}")
    return tuple(value)


def _check_tensor(name, t, ndim, like=None, dtype=None):
    """Type, rank and dtype of `t`; same device as `like`, or (no `like`) a device Triton can run on."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is None and t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if like is None:
        if t.device.type != "cuda" and not (_interpreting() and t.device.type == "cpu"):
            raise ValueError(f"{name} must be a CUDA tensor (CPU only under TRITON_INTERPRET=1), got {t.device}")
    elif t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the other inputs, got {t.device}")


def _check_common(like, weight_shape, mask_bits, stride, padding, dilation, groups):
    """Checks shared by the three launchers; returns normalised (stride, padding, dilation)."""
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    dilation = _pair("dilation", dilation, 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    co = weight_shape[0]
    if co % groups != 0:
        raise ValueError(f"weight out channels ({co}) must be divisible by groups={groups}")
    cols = weight_shape[1] * weight_shape[2] * weight_shape[3]
    _check_tensor("mask_bits", mask_bits, 2, like, torch.int32)
    expected = (co, triton.cdiv(cols, 32))
    if tuple(mask_bits.shape) != expected:
        raise ValueError(f"mask_bits must have shape {expected} (Co, ceil(C/groups*KH*KW/32)), "
                         f"got {tuple(mask_bits.shape)}")
    if not mask_bits.is_contiguous():
        raise ValueError("mask_bits must be contiguous")
    return stride, padding, dilation


def _out_size(x_shape, weight_shape, stride, padding, dilation):
    oh = (x_shape[2] + 2 * padding[0] - dilation[0] * (weight_shape[2] - 1) - 1) // stride[0] + 1
    ow = (x_shape[3] + 2 * padding[1] - dilation[1] * (weight_shape[3] - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"output would be empty ({oh}x{ow}) for input {tuple(x_shape[2:])}, kernel "
                         f"{tuple(weight_shape[2:])}, stride {stride}, padding {padding}, dilation {dilation}")
    return oh, ow


def _check_channels(x_name, x_shape, weight_shape, groups):
    if x_shape[1] != weight_shape[1] * groups:
        raise ValueError(f"{x_name} has {x_shape[1]} channels, expected weight.shape[1] * groups = "
                         f"{weight_shape[1]} * {groups}")


# CUDA grids allow at most 65535 programs along y and z; groups (times bwd_weight's reduction
# splits) run along z.
_MAX_GRID_Z = 65535


def _check_groups(groups, models=1):
    if models * groups > _MAX_GRID_Z:
        what = "groups" if models == 1 else f"models * groups ({models} * {groups})"
        raise ValueError(f"groups: expected at most {_MAX_GRID_Z} {what} (one grid axis of the kernels), "
                         f"got {models * groups}")


def _on(device):
    """Launch on the inputs' GPU: Triton launches on the current CUDA device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype, allow_tf32):
    return "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"


def _empty_like_layout(shape, like):
    """Output in channels_last when `like` is, as torch's conv2d does."""
    fmt = (torch.channels_last if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
           else torch.contiguous_format)
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def _check_stacked(x_name, x, weight, mask_bits, bias=None):
    """Ranks, model counts and the stacked mask/bias shapes of a stacked launcher's operands; returns
    the flat views ``(S*Co, C/groups, KH, KW)``, ``(S*Co, words)``, ``(S*Co,)`` of weight, mask, bias."""
    _check_tensor(x_name, x, 5)
    _check_tensor("weight", weight, 5, x, x.dtype)
    s, co = weight.shape[:2]
    if x.shape[0] != s:
        raise ValueError(f"{x_name} must hold {s} models (weight.shape[0]) along dim 0, got shape {tuple(x.shape)}")
    _check_tensor("mask_bits", mask_bits, 3, x, torch.int32)
    if mask_bits.shape[0] != s or not mask_bits.is_contiguous():
        raise ValueError(f"mask_bits must be contiguous with {s} models along dim 0, got shape "
                         f"{tuple(mask_bits.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 2, x, x.dtype)
        if tuple(bias.shape) != (s, co):
            raise ValueError(f"bias must have shape ({s}, {co}), got {tuple(bias.shape)}")
        bias = bias.reshape(s * co).contiguous()  # the kernel reads bias[row] at unit stride
    return weight.reshape(s * co, *weight.shape[2:]), mask_bits.view(s * co, mask_bits.shape[2]), bias


def _launch_fwd(x, weight, mask_bits, bias, y, groups, stride, padding, dilation, allow_tf32):
    """x (S, Nb, C, H, W), weight (S*Co, C/groups, KH, KW), mask_bits (S*Co, words), bias (S*Co,) or
    None, y (S, Nb, Co, OH, OW): checked by the caller."""
    s, nb, c, h, w = x.shape
    co, oh, ow = y.shape[2:]
    if y.numel() == 0:
        return y
    _check_groups(groups, s)
    cg, cog = c // groups, co // groups
    grid = lambda meta: (triton.cdiv(nb * oh * ow, meta["BLOCK_M"]), triton.cdiv(cog, meta["BLOCK_N"]), s * groups)
    with _on(x.device):
        _masked_conv2d_fwd_kernel[grid](
            x, weight, mask_bits, bias if bias is not None else weight, y,
            nb, h, w, oh, ow, cg, cog, triton.next_power_of_2(nb * oh * ow),
            *x.stride(), *weight.stride(), *y.stride(),
            mask_bits.stride(0),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            G=groups, KH=weight.shape[2], KW=weight.shape[3], HAS_BIAS=bias is not None,
            DOT_PRECISION=_dot_precision(x.dtype, allow_tf32),
        )
    return y


def masked_conv2d_fwd(x, weight, mask_bits, bias, stride, padding, dilation, groups, *, allow_tf32=False):
    """y = conv2d(x, weight * mask, bias, stride, padding, dilation, groups).

    x (Nb, C, H, W), weight (Co, C/groups, KH, KW), mask_bits int32 (Co, ceil(C/groups*KH*KW/32)),
    bias (Co,) or None; float32/float16/bfloat16, one dtype. Any strides of x and weight.
    Returns y (Nb, Co, OH, OW) in x's dtype, channels_last when x is. fp32 accumulation; fp32 inputs
    use IEEE fp32 products unless allow_tf32.
    """
    _check_tensor("x", x, 4)
    _check_tensor("weight", weight, 4, x, x.dtype)
    stride, padding, dilation = _check_common(x, weight.shape, mask_bits, stride, padding, dilation, groups)
    _check_channels("x", x.shape, weight.shape, groups)
    co = weight.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, 1, x, x.dtype)
        if bias.shape[0] != co:
            raise ValueError(f"bias must have shape ({co},), got {tuple(bias.shape)}")
        bias = bias.contiguous()  # the kernel reads bias[co] at unit stride
    _check_groups(groups)
    oh, ow = _out_size(x.shape, weight.shape, stride, padding, dilation)
    y = _empty_like_layout((x.shape[0], co, oh, ow), x)
    _launch_fwd(x[None], weight, mask_bits, bias, y[None], groups, stride, padding, dilation, allow_tf32)
    return y


def stacked_masked_conv2d_fwd(x, weight, mask_bits, bias, stride, padding, dilation, groups, *, allow_tf32=False):
    """y[s] = conv2d(x[s], weight[s] * mask[s], bias[s], ...) for the S stacked models, one launch.

    x (S, Nb, C, H, W), weight (S, Co, C/groups, KH, KW), mask_bits int32 (S, Co, words) contiguous,
    bias (S, Co) or None; one float dtype; any strides of x and weight. Returns contiguous y
    (S, Nb, Co, OH, OW) in x's dtype.
    """
    w_rows, bits_rows, bias_rows = _check_stacked("x", x, weight, mask_bits, bias)
    stride, padding, dilation = _check_common(x, weight.shape[1:], mask_bits[0], stride, padding, dilation, groups)
    _check_channels("x", x.shape[1:], weight.shape[1:], groups)
    oh, ow = _out_size(x.shape[1:], weight.shape[1:], stride, padding, dilation)
    y = torch.empty((x.shape[0], x.shape[1], weight.shape[1], oh, ow), dtype=x.dtype, device=x.device)
    return _launch_fwd(x, w_rows, bits_rows, bias_rows, y, groups, stride, padding, dilation, allow_tf32)


def _launch_bwd_input(dy, weight, mask_bits, dx, groups, stride, padding, dilation, allow_tf32):
    """dy (S, Nb, Co, OH, OW), weight (S*Co, C/groups, KH, KW), mask_bits (S*Co, words), dx
    (S, Nb, C, H, W): checked by the caller, except the int32 span of one image of dy."""
    s, nb, c, h, w = dx.shape
    co, oh, ow = dy.shape[2:]
    # The kernel's offsets within one image of dy along (OH, OW) are int32 (see the kernel).
    span = (oh - 1) * abs(dy.stride(3)) + (ow - 1) * abs(dy.stride(4))
    if span >= 2**30:
        raise ValueError(f"dy: one image spans {span} elements along (OH, OW) with strides {tuple(dy.stride())}; "
                         f"expected fewer than 2**30")
    if dx.numel() == 0:
        return dx
    _check_groups(groups, s)
    cg, cog = c // groups, co // groups
    grid = lambda meta: (triton.cdiv(nb * h * w, meta["BLOCK_M"]), triton.cdiv(cg, meta["BLOCK_N"]), s * groups)
    with _on(dy.device):
        _masked_conv2d_bwd_input_kernel[grid](
            dy, weight, mask_bits, dx,
            nb, h, w, oh, ow, cg, cog, triton.next_power_of_2(nb * h * w),
            *dy.stride(), *weight.stride(), *dx.stride(),
            mask_bits.stride(0),
            padding[0], padding[1], dilation[0], dilation[1],
            SH=stride[0], SW=stride[1], G=groups, KH=weight.shape[2], KW=weight.shape[3],
            DOT_PRECISION=_dot_precision(dy.dtype, allow_tf32),
        )
    return dx


def masked_conv2d_bwd_input(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups, *,
                            allow_tf32=False):
    """dx = conv2d_input(x_shape, weight * mask, dy, ...): the gradient of masked_conv2d_fwd w.r.t. x.

    dy (Nb, Co, OH, OW) with any strides, weight (Co, C/groups, KH, KW), x_shape (Nb, C, H, W).
    Returns dx (Nb, C, H, W) in dy's dtype, channels_last when dy is.
    """
    _check_tensor("dy", dy, 4)
    _check_tensor("weight", weight, 4, dy, dy.dtype)
    stride, padding, dilation = _check_common(dy, weight.shape, mask_bits, stride, padding, dilation, groups)
    x_shape = _shape4("x_shape", x_shape)
    _check_channels("x_shape", x_shape, weight.shape, groups)
    nb, c, h, w = x_shape
    co = weight.shape[0]
    oh, ow = _out_size(x_shape, weight.shape, stride, padding, dilation)
    if tuple(dy.shape) != (nb, co, oh, ow):
        raise ValueError(f"dy must have shape {(nb, co, oh, ow)} for x_shape {x_shape}, got {tuple(dy.shape)}")
    _check_groups(groups)
    dx = _empty_like_layout(x_shape, dy)
    _launch_bwd_input(dy[None], weight, mask_bits, dx[None], groups, stride, padding, dilation, allow_tf32)
    return dx


def stacked_masked_conv2d_bwd_input(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups, *,
                                    allow_tf32=False):
    """dx[s] = conv2d_input(x_shape[1:], weight[s] * mask[s], dy[s], ...) for the S stacked models, one launch.

    dy (S, Nb, Co, OH, OW) with any strides, weight (S, Co, C/groups, KH, KW), x_shape (S, Nb, C, H, W).
    Returns contiguous dx of x_shape in dy's dtype.
    """
    w_rows, bits_rows, _ = _check_stacked("dy", dy, weight, mask_bits)
    stride, padding, dilation = _check_common(dy, weight.shape[1:], mask_bits[0], stride, padding, dilation, groups)
    if (not isinstance(x_shape, (tuple, list, torch.Size)) or len(x_shape) != 5
            or not all(isinstance(v, int) and v >= 0 for v in x_shape)):
        raise ValueError(f"x_shape must be 5 non-negative ints, got {x_shape!r}")
    x_shape = tuple(x_shape)
    _check_channels("x_shape", x_shape[1:], weight.shape[1:], groups)
    oh, ow = _out_size(x_shape[1:], weight.shape[1:], stride, padding, dilation)
    expected = (weight.shape[0], x_shape[1], weight.shape[1], oh, ow)
    if x_shape[0] != weight.shape[0] or tuple(dy.shape) != expected:
        raise ValueError(f"dy must have shape {expected} for x_shape {x_shape}, got {tuple(dy.shape)}")
    dx = torch.empty(x_shape, dtype=dy.dtype, device=dy.device)
    return _launch_bwd_input(dy, w_rows, bits_rows, dx, groups, stride, padding, dilation, allow_tf32)


def _default_split(reduction, tiles, device):
    """Split the Nb*OH*OW reduction so that small weight GEMMs still fill the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), reduction // 512, 64))


def _launch_bwd_weight(dy, x, mask_bits, weight_shape, groups, stride, padding, dilation, allow_tf32, split_k):
    """dy (S, Nb, Co, OH, OW), x (S, Nb, C, H, W), mask_bits (S*Co, words), weight_shape
    (S*Co, C/groups, KH, KW): checked by the caller. Returns contiguous dw of weight_shape."""
    s, nb, c, h, w = x.shape
    rows, cg, kh, kw = weight_shape
    oh, ow = dy.shape[3:]
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k must be None or an int >= 1, got {split_k!r}")
    cog, cols = rows // (s * groups), cg * kh * kw
    reduction = nb * oh * ow
    if reduction == 0 or rows == 0 or cols == 0:
        return torch.zeros(weight_shape, dtype=x.dtype, device=x.device)
    _check_groups(groups, s)
    if split_k is None:
        split_k = _default_split(reduction, triton.cdiv(cog, 64) * triton.cdiv(cols, 64) * s * groups, x.device)
    # models * groups * splits share the grid's z axis (at most 65535 programs).
    split_k = min(split_k, _MAX_GRID_Z // (s * groups))
    # Split boundaries on multiples of 128 keep the loads of each split aligned like the unsplit ones.
    split_len = triton.cdiv(triton.cdiv(reduction, split_k), 128) * 128
    n_split = triton.cdiv(reduction, split_len)
    dw = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
    if n_split == 1:
        out = dw.view(1, rows, cols)
    else:
        out = torch.empty((n_split, rows, cols), dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(cog, meta["BLOCK_M"]), triton.cdiv(cols, meta["BLOCK_N"]),
                         s * groups * n_split)
    with _on(x.device):
        _masked_conv2d_bwd_weight_kernel[grid](
            dy, x, mask_bits, out,
            nb, h, w, oh, ow, cg, cog, triton.next_power_of_2(reduction),
            *dy.stride(), *x.stride(), *out.stride(),
            mask_bits.stride(0),
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            n_split, split_len,
            G=groups, KH=kh, KW=kw, DOT_PRECISION=_dot_precision(x.dtype, allow_tf32),
        )
    if n_split > 1:
        dw.copy_(out.sum(0).view(weight_shape))
    return dw


def masked_conv2d_bwd_weight(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups, *,
                             allow_tf32=False, split_k=None):
    """dw = conv2d_weight(x, weight_shape, dy, ...) * mask: the gradient of masked_conv2d_fwd w.r.t. weight.

    dy (Nb, Co, OH, OW) and x (Nb, C, H, W) with any strides, one dtype; weight_shape (Co, C/groups, KH, KW).
    Returns contiguous dw of weight_shape in x's dtype, exact zeros where mask_bits prune.
    The Nb*OH*OW reduction is cut into `split_k` fp32 partial sums (default: enough to fill the
    GPU), summed in a fixed order, so results are deterministic.
    """
    _check_tensor("x", x, 4)
    _check_tensor("dy", dy, 4, x, x.dtype)
    weight_shape = _shape4("weight_shape", weight_shape)
    stride, padding, dilation = _check_common(x, weight_shape, mask_bits, stride, padding, dilation, groups)
    _check_channels("x", x.shape, weight_shape, groups)
    nb = x.shape[0]
    oh, ow = _out_size(x.shape, weight_shape, stride, padding, dilation)
    if tuple(dy.shape) != (nb, weight_shape[0], oh, ow):
        raise ValueError(f"dy must have shape {(nb, weight_shape[0], oh, ow)} for x {tuple(x.shape)}, "
                         f"got {tuple(dy.shape)}")
    _check_groups(groups)
    return _launch_bwd_weight(dy[None], x[None], mask_bits, weight_shape, groups, stride, padding, dilation,
                              allow_tf32, split_k)


def stacked_masked_conv2d_bwd_weight(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups, *,
                                     allow_tf32=False, split_k=None):
    """dw[s] = conv2d_weight(x[s], ..., dy[s]) * mask[s] for the S stacked models, one launch.

    dy (S, Nb, Co, OH, OW) and x (S, Nb, C, H, W) with any strides; weight_shape (S, Co, C/groups, KH, KW).
    Returns contiguous dw of weight_shape, exact zeros where mask_bits prune.
    """
    if (not isinstance(weight_shape, (tuple, list, torch.Size)) or len(weight_shape) != 5
            or not all(isinstance(v, int) and v >= 0 for v in weight_shape)):
        raise ValueError(f"weight_shape must be 5 non-negative ints, got {weight_shape!r}")
    weight_shape = tuple(weight_shape)
    _check_tensor("x", x, 5)
    _check_tensor("dy", dy, 5, x, x.dtype)
    s, co = weight_shape[:2]
    _check_tensor("mask_bits", mask_bits, 3, x, torch.int32)
    if x.shape[0] != s or mask_bits.shape[0] != s or not mask_bits.is_contiguous():
        raise ValueError(f"x and mask_bits (contiguous) must hold {s} models (weight_shape[0]) along dim 0, got "
                         f"shapes {tuple(x.shape)} and {tuple(mask_bits.shape)}")
    stride, padding, dilation = _check_common(x, weight_shape[1:], mask_bits[0], stride, padding, dilation, groups)
    _check_channels("x", x.shape[1:], weight_shape[1:], groups)
    oh, ow = _out_size(x.shape[1:], weight_shape[1:], stride, padding, dilation)
    if tuple(dy.shape) != (s, x.shape[1], co, oh, ow):
        raise ValueError(f"dy must have shape {(s, x.shape[1], co, oh, ow)} for x {tuple(x.shape)}, "
                         f"got {tuple(dy.shape)}")
    dw = _launch_bwd_weight(dy, x, mask_bits.view(s * co, mask_bits.shape[2]), (s * co,) + weight_shape[2:],
                            groups, stride, padding, dilation, allow_tf32, split_k)
    return dw.view(weight_shape)
