"""Triton GEMMs for stacked_masked_linear: S independent masked linears in one launch.

Shapes (S models stacked along a leading axis): x (S, M, K), weight (S, N, K), mask_bits
(S, N, ceil(K/32)) int32, bias (S, N), dy (S, M, N).

    stacked_masked_linear_fwd        y[s]  = x[s] @ (W[s]*M[s])^T + b[s]   (S, M, N)
    stacked_masked_linear_bwd_input  dX[s] = dY[s] @ (W[s]*M[s])          (S, M, K)
    stacked_masked_linear_bwd_weight dW[s] = (dY[s]^T @ X[s]) * M[s]      (S, N, K)

The kernels are those of ``kernels/masked_linear.py`` (same tiles, mask expansion in registers,
autotune configs and pruning) with a second grid axis over the S models: program (tile, s) offsets
every pointer by model s's stride. Each model has its own mask, so one launch trains S differently
pruned models. Operands may have arbitrary 3-D strides (a stride of 0 along S broadcasts one input
to every model).
"""
import torch
import triton
import triton.language as tl

from sparse_engine.kernels.masked_linear import (_BWD_INPUT, _BWD_WEIGHT, _DTYPES, _FWD, _INTERPRET, _KEY,
                                                 _expand_bits, _grouped_tile, _on_device_of, _precision, _pruner)


@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by={"early_config_prune": _pruner("BLOCK_K", "x_ptr")})
@triton.jit
def _stacked_fwd_kernel(
    x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xs, stride_xm, stride_xk, stride_ws, stride_wn, stride_wk, stride_bits_s, stride_bits_n, stride_bits_w,
    stride_bias_s, stride_bias_n, stride_ys, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    x_ptr += s * stride_xs
    w_ptr += s * stride_ws
    bits_ptr += s * stride_bits_s
    bias_ptr += s * stride_bias_s
    y_ptr += s * stride_ys
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_word = tl.arange(0, BLOCK_K // 32)
    num_words = tl.cdiv(K, 32)

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    bits_ptrs = bits_ptr + offs_n[:, None].to(tl.int64) * stride_bits_n + offs_word[None, :] * stride_bits_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        words = tl.load(bits_ptrs, mask=offs_word[None, :] < num_words - kt * (BLOCK_K // 32), other=0)
        w = tl.where(_expand_bits(words, BLOCK_N, BLOCK_K), w, 0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        bits_ptrs += (BLOCK_K // 32) * stride_bits_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias_n, mask=offs_n < N, other=0.0)
        acc += bias[None, :].to(acc.dtype)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_BWD_INPUT, key=_KEY, prune_configs_by={"early_config_prune": _pruner("BLOCK_N", "dy_ptr")})
@triton.jit
def _stacked_bwd_input_kernel(
    dy_ptr, w_ptr, bits_ptr, dx_ptr,
    M, N, K,
    stride_dys, stride_dym, stride_dyn, stride_ws, stride_wn, stride_wk, stride_bits_s, stride_bits_n,
    stride_bits_w, stride_dxs, stride_dxm, stride_dxk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    dy_ptr += s * stride_dys
    w_ptr += s * stride_ws
    bits_ptr += s * stride_bits_s
    dx_ptr += s * stride_dxs
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)) % K
    offs_n = tl.arange(0, BLOCK_N)
    offs_word = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    word_ok = offs_word[None, :] < tl.cdiv(K, 32)

    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk
    bits_ptrs = bits_ptr + offs_n[:, None] * stride_bits_n + offs_word[None, :] * stride_bits_w

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for nt in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - nt * BLOCK_N
        dy = tl.load(dy_ptrs, mask=n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        words = tl.load(bits_ptrs, mask=n_ok[:, None] & word_ok, other=0)
        w = tl.where(_expand_bits(words, BLOCK_N, BLOCK_K), w, 0.0)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        bits_ptrs += BLOCK_N * stride_bits_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(configs=_BWD_WEIGHT, key=_KEY, prune_configs_by={"early_config_prune": _pruner("BLOCK_M", "x_ptr")})
@triton.jit
def _stacked_bwd_weight_kernel(
    dy_ptr, x_ptr, bits_ptr, dw_ptr,
    M, N, K,
    stride_dys, stride_dym, stride_dyn, stride_xs, stride_xm, stride_xk, stride_bits_s, stride_bits_n,
    stride_bits_w, stride_dws, stride_dwn, stride_dwk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    s = tl.program_id(1).to(tl.int64)
    dy_ptr += s * stride_dys
    x_ptr += s * stride_xs
    bits_ptr += s * stride_bits_s
    dw_ptr += s * stride_dws
    pid_n, pid_k = _grouped_tile(N, K, BLOCK_N, BLOCK_K, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_word = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    words = tl.load(
        bits_ptr + rows[:, None].to(tl.int64) * stride_bits_n + offs_word[None, :] * stride_bits_w,
        mask=(rows[:, None] < N) & (offs_word[None, :] < tl.cdiv(K, 32)), other=0,
    )
    keep = _expand_bits(words, BLOCK_N, BLOCK_K)
    # A tile whose weights are all pruned is zero whatever dY and X hold: skip its reduction.
    any_kept = tl.max((words != 0).to(tl.int32))

    offs_n = rows % N
    offs_k = cols % K
    offs_m = tl.arange(0, BLOCK_M)
    dyt_ptrs = dy_ptr + offs_n[:, None].to(tl.int64) * stride_dyn + offs_m[None, :] * stride_dym
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for mt in range(0, tl.cdiv(M, BLOCK_M) * any_kept):
        m_left = M - mt * BLOCK_M
        dyt = tl.load(dyt_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
        x = tl.load(x_ptrs, mask=offs_m[:, None] < m_left, other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=PRECISION, out_dtype=acc.dtype)
        dyt_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm

    dw = tl.where(keep, acc, 0.0).to(dw_ptr.dtype.element_ty)
    dw_ptrs = dw_ptr + rows[:, None].to(tl.int64) * stride_dwn + cols[None, :] * stride_dwk
    tl.store(dw_ptrs, dw, mask=(rows[:, None] < N) & (cols[None, :] < K))


# ---- launchers ----------------------------------------------------------------------------------

def _check_first(name: str, t: torch.Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name}: expected a 3-D tensor (models, rows, cols), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    if not _INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on '{t.device}'")


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
            x, weight, mask_bits, b, y, M, N, K,
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
            dy, weight, mask_bits, dx, M, N, K,
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
            dy, x, mask_bits, dw, M, N, K,
            *dy.stride(), *x.stride(), *mask_bits.stride(), *dw.stride(),
            PRECISION=_precision(x.dtype, allow_tf32),
        )
    return dw
