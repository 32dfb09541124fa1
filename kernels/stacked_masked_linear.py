"""Triton GEMMs for stacked_masked_linear: S independent masked linears in one launch.

Shapes (S models stacked along a leading axis): x (S, M, K), weight (S, N, K), mask_bits
(S, N, ceil(K/32)) int32, bias (S, N), dy (S, M, N).

    stacked_masked_linear_fwd        y[s]  = x[s] @ (W[s]*M[s])^T + b[s]   (S, M, N)
    stacked_masked_linear_bwd_input  dX[s] = dY[s] @ (W[s]*M[s])          (S, M, K)
    stacked_masked_linear_bwd_weight dW[s] = (dY[s]^T @ X[s]) * M[s]      (S, N, K)

The kernels are those of ``kernels/masked_linear.py`` (its per-program tile functions, autotune
configs and pruning) with a second grid axis over the S models: program (tile, s) runs the
single-model tile on model s's operands (every pointer offset by model s's stride). Each model
has its own mask, so one launch trains S differently
pruned models. Operands may have arbitrary 3-D strides (a stride of 0 along S broadcasts one input
to every model).
"""
import torch
import triton
import triton.language as tl

from sparse_engine.kernels.masked_linear import _check_first as check_first
from sparse_engine.kernels.masked_linear import (_BWD_INPUT, _BWD_WEIGHT, _DTYPES, _FWD, _INTERPRET, _KEY,
                                                 _bwd_input_tile, _bwd_weight_tile, _fwd_tile, _on_device_of,
                                                 _precision, _pruner)


@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _stacked_fwd_kernel(
    x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xs, stride_xm, stride_xk, stride_ws, stride_wn, stride_wk, stride_bits_s, stride_bits_n, stride_bits_w,
    stride_bias_s, stride_bias_n, stride_ys, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    _fwd_tile(
        x_ptr + s * stride_xs, w_ptr + s * stride_ws, bits_ptr + s * stride_bits_s, bias_ptr + s * stride_bias_s,
        y_ptr + s * stride_ys, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_bits_n, stride_bits_w,
        stride_bias_n, stride_ym, stride_yn, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
    )


@triton.autotune(configs=_BWD_INPUT, key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("bwd_input", "dy_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _stacked_bwd_input_kernel(
    dy_ptr, w_ptr, bits_ptr, dx_ptr,
    M, N, K, M_BUCKET,
    stride_dys, stride_dym, stride_dyn, stride_ws, stride_wn, stride_wk, stride_bits_s, stride_bits_n,
    stride_bits_w, stride_dxs, stride_dxm, stride_dxk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    _bwd_input_tile(
        dy_ptr + s * stride_dys, w_ptr + s * stride_ws, bits_ptr + s * stride_bits_s, dx_ptr + s * stride_dxs,
        M, N, K, stride_dym, stride_dyn, stride_wn, stride_wk, stride_bits_n, stride_bits_w, stride_dxm, stride_dxk,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
    )


@triton.autotune(configs=_BWD_WEIGHT, key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("bwd_weight", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _stacked_bwd_weight_kernel(
    dy_ptr, x_ptr, bits_ptr, dw_ptr,
    M, N, K, M_BUCKET,
    stride_dys, stride_dym, stride_dyn, stride_xs, stride_xm, stride_xk, stride_bits_s, stride_bits_n,
    stride_bits_w, stride_dws, stride_dwn, stride_dwk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    _bwd_weight_tile(
        dy_ptr + s * stride_dys, x_ptr + s * stride_xs, bits_ptr + s * stride_bits_s, dw_ptr + s * stride_dws,
        M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk, stride_bits_n, stride_bits_w, stride_dwn, stride_dwk,
        PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
    )


# ---- launchers ----------------------------------------------------------------------------------

def _check_first(name: str, t: torch.Tensor) -> None:
    check_first(name, t, 3, "(models, rows, cols)")


def _check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def stacked_masked_linear_fwd(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                              bias: torch.Tensor | None = None, *, allow_tf32: bool = False) -> torch.Tensor:
    """y[s] = x[s] @ (weight[s] * mask[s])^T + bias[s] for every model s.

    x (S, M, K), weight (S, N, K), bias (S, N) or None: one dtype, any strides. mask_bits
    (S, N, ceil(K/32)) int32. Returns a new contiguous (S, M, N) tensor in x's dtype.
    """
    _check_first("x", x)
    S, M, K = x.shape
    if weight.dim() != 3:
        raise ValueError(f"weight: expected a 3-D tensor (S, N, K), got shape {tuple(weight.shape)}")
    N = weight.shape[1]
    _check("weight", weight, (S, N, K), x.dtype, x.device)
    _check("mask_bits", mask_bits, (S, N, triton.cdiv(K, 32)), torch.int32, x.device)
    if bias is not None:
        _check("bias", bias, (S, N), x.dtype, x.device)
    y = torch.empty((S, M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    b = bias if bias is not None else y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), S)
    with _on_device_of(x):
        _stacked_fwd_kernel[grid](
            x, weight, mask_bits, b, y, M, N, K, triton.next_power_of_2(M),
            *x.stride(), *weight.stride(), *mask_bits.stride(),
            b.stride(0) if bias is not None else 0, b.stride(1) if bias is not None else 0, *y.stride(),
            HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype, allow_tf32),
        )
    return y


def stacked_masked_linear_bwd_input(dy: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                                    *, allow_tf32: bool = False) -> torch.Tensor:
    """dx[s] = dy[s] @ (weight[s] * mask[s]). dy (S, M, N), weight (S, N, K). Returns (S, M, K)."""
    _check_first("dy", dy)
    S, M, N = dy.shape
    if weight.dim() != 3:
        raise ValueError(f"weight: expected a 3-D tensor (S, N, K), got shape {tuple(weight.shape)}")
    K = weight.shape[2]
    _check("weight", weight, (S, N, K), dy.dtype, dy.device)
    _check("mask_bits", mask_bits, (S, N, triton.cdiv(K, 32)), torch.int32, dy.device)
    dx = torch.empty((S, M, K), dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    if N == 0:
        return dx.zero_()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]), S)
    with _on_device_of(dy):
        _stacked_bwd_input_kernel[grid](
            dy, weight, mask_bits, dx, M, N, K, triton.next_power_of_2(M),
            *dy.stride(), *weight.stride(), *mask_bits.stride(), *dx.stride(),
            PRECISION=_precision(dy.dtype, allow_tf32),
        )
    return dx


def stacked_masked_linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                                     *, allow_tf32: bool = False) -> torch.Tensor:
    """dw[s] = (dy[s]^T @ x[s]) * mask[s], exact zeros where pruned. dy (S, M, N), x (S, M, K).
    Returns (S, N, K)."""
    _check_first("x", x)
    S, M, K = x.shape
    if dy.dim() != 3:
        raise ValueError(f"dy: expected a 3-D tensor (S, M, N), got shape {tuple(dy.shape)}")
    N = dy.shape[2]
    _check("dy", dy, (S, M, N), x.dtype, x.device)
    _check("mask_bits", mask_bits, (S, N, triton.cdiv(K, 32)), torch.int32, x.device)
    dw = torch.empty((S, N, K), dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if M == 0:
        return dw.zero_()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), S)
    with _on_device_of(x):
        _stacked_bwd_weight_kernel[grid](
            dy, x, mask_bits, dw, M, N, K, triton.next_power_of_2(M),
            *dy.stride(), *x.stride(), *mask_bits.stride(), *dw.stride(),
            PRECISION=_precision(x.dtype, allow_tf32),
        )
    return dw
