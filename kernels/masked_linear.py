"""Triton GEMM kernels for masked_linear: y = x (W*M)^T + b and its two gradients.

Shapes: x (M, K), weight (N, K), mask_bits (N, ceil(K/32)) int32 (bit j of word w in row n keeps
element (n, 32*w + j)), bias (N,), dy (M, N).

    masked_linear_fwd        y  = x @ (W*M)^T + b   (M, N)
    masked_linear_bwd_input  dX = dY @ (W*M)        (M, K)
    masked_linear_bwd_weight dW = (dY^T @ X) * M    (N, K), exact zeros where pruned

W*M never exists in memory: each W tile is loaded with the mask words that cover it, the words are
expanded to bits in registers and pruned entries are replaced by zero before tl.dot. Expansion
loads a [rows, BLOCK_K//32] tile of words, broadcasts it against the 32 shift amounts to
[rows, BLOCK_K//32, 32] and reshapes to [rows, BLOCK_K]: one load per 32 elements instead of a
gathered load per element. BLOCK_K (the tile extent along the weight's K axis) is therefore always
a multiple of 32, and tiles along K start on word boundaries.

Accumulation is fp32; fp32 inputs use exact fp32 products unless the caller passes allow_tf32=True.
fp64 runs only under the interpreter (CPU tensors, for tests): on CUDA its tiles would spill, and
exceed sm_80's shared memory, so the launchers refuse it. Operands may have arbitrary 2-D strides.

Configs are chosen per dtype and architecture (reachable_configs): tensor-core tiles for fp16, bf16
and TF32, narrow-K tiles for exact fp32 (FMA dots), fewer large tiles on sm_80, and a shared-memory
budget from the device; kernels/aot.py compiles every one for sm_90a and sm_80 and fails on spills.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from sparse_engine.kernels.arch import device_arch, smem_limit

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _config(block_m, block_n, block_k, num_stages, num_warps):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP": 8},
        num_stages=num_stages, num_warps=num_warps,
    )


# _config(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps): blocks are named after the op's M, N, K
# axes whatever role each axis plays in a kernel.
#
# Tensor-core configs (fp16, bf16, and fp32 with allow_tf32), less those that spill (_SPILLS_*).
_FWD_MMA = [
    # large M (prefill, training): 8192x4096x4096 class problems
    _config(128, 256, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 64, 3, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    # small M (decode): the tile along M cannot go below 16 (tl.dot). Reading W dominates, so
    # narrow N tiles (N = 4096 -> 128 or 256 programs) keep every SM streaming it.
    _config(16, 16, 256, 4, 4),
    _config(16, 32, 128, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(16, 128, 128, 3, 4),
    _config(32, 64, 128, 4, 4),
    _config(32, 128, 64, 4, 4),
]
# dX (M, K): output tile BLOCK_M x BLOCK_K, reduction over N.
_BWD_INPUT_MMA = [
    _config(128, 64, 256, 3, 8),
    _config(128, 64, 128, 4, 8),
    _config(128, 64, 128, 3, 4),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 64, 4, 4),
    # small M: 32-column tiles (one mask word) give K = 4096 128 programs
    _config(16, 128, 32, 4, 4),
    _config(16, 128, 64, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(32, 128, 64, 4, 4),
]
# dW (N, K): output tile BLOCK_N x BLOCK_K, reduction over M.
_BWD_WEIGHT_MMA = [
    _config(64, 128, 256, 3, 8),
    _config(64, 128, 128, 4, 8),
    _config(64, 128, 128, 3, 4),
    _config(64, 64, 128, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(16, 128, 128, 4, 4),
    _config(32, 128, 128, 4, 4),
    _config(32, 64, 64, 4, 4),
]
# Exact fp32 products (IEEE, torch's default for fp32) run on FMA units, where a dot operand of R
# rows and C reduction columns holds R*C/threads values in registers: the tensor-core tiles above
# spill 0.4-47 KB a thread. These keep the reduction slice narrow (16 or 32, the mask word for the
# forward's K) and the output tile at most 64x64 (8 warps for the forward's 64x64).
_FWD_FP32 = [
    _config(64, 64, 32, 3, 8),
    _config(64, 32, 32, 3, 4),
    _config(32, 64, 32, 3, 4),
    _config(16, 64, 32, 3, 4),
    _config(16, 32, 32, 3, 4),
]
_BWD_INPUT_FP32 = [
    _config(64, 16, 64, 3, 4),
    _config(64, 32, 32, 3, 4),
    _config(32, 16, 64, 3, 4),
    _config(16, 16, 64, 3, 4),
    _config(16, 32, 32, 3, 4),
]
_BWD_WEIGHT_FP32 = [
    _config(16, 64, 64, 3, 4),
    _config(32, 64, 32, 3, 4),
    _config(16, 32, 64, 3, 4),
    _config(16, 64, 32, 3, 4),
]
_TABLES = {
    "fwd": (_FWD_MMA, _FWD_FP32, "BLOCK_K"),
    "bwd_input": (_BWD_INPUT_MMA, _BWD_INPUT_FP32, "BLOCK_N"),
    "bwd_weight": (_BWD_WEIGHT_MMA, _BWD_WEIGHT_FP32, "BLOCK_M"),
}
# Tensor-core configs that spill registers (ptxas -v through kernels/aot.py, Triton 3.9): with fp32
# operands (TF32) on every architecture, and with 16-bit ones on sm_80, which holds the tile's
# accumulator and operand fragments in registers that sm_90's wgmma keeps in shared memory.
# Keys: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps).
_SPILLS_TF32 = {
    "fwd": {(128, 128, 64, 3, 4), (32, 64, 128, 4, 4)},
    "bwd_input": {(128, 64, 128, 3, 4), (32, 128, 64, 4, 4)},
    "bwd_weight": {(64, 128, 128, 3, 4), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4)},
}
_SPILLS_SM80 = {
    "fwd": {(128, 256, 64, 3, 8), (128, 128, 64, 3, 4)},
    "bwd_input": {(128, 64, 128, 3, 4)},
    "bwd_weight": {(64, 128, 128, 3, 4), (32, 128, 128, 4, 4)},
}
# The interpreter gets one small config: with a single config the autotuner launches without timing
# anything (timing needs a GPU).
_INTERPRETER_CONFIG = _config(32, 32, 32, 1, 4)
# Margin between the operand-tile estimate below and the architecture's limit: the pipelined mask
# words and the epilogue's scratch, which the estimate leaves out (kernels/aot.py checks the real
# figure of every config this admits on sm_80 and sm_90a).
_SMEM_MARGIN = 24 * 1024


def _key(c) -> tuple:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps


def _smem_estimate(c, reduce: str, itemsize: int) -> int:
    out_r, out_c = (c.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b != reduce)
    return c.num_stages * (out_r + out_c) * c.kwargs[reduce] * itemsize


def reachable_configs(kernel: str, dtype: torch.dtype, allow_tf32: bool, arch: int,
                      smem: int | None = None) -> list:
    """The configs kernel ("fwd", "bwd_input", "bwd_weight") may launch with for `dtype` on a GPU of
    capability `arch` (major*10 + minor) with `smem` bytes of shared memory a block (default: the
    architecture's). The autotuner narrows these further by M (see _pruner)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype: expected float16, bfloat16 or float32 on CUDA, got {dtype}")
    mma, fp32, reduce = _TABLES[kernel]
    if dtype == torch.float32 and not allow_tf32:
        configs = fp32
    else:
        spills = _SPILLS_TF32[kernel] if dtype == torch.float32 else set()
        if arch < 90:
            spills = spills | _SPILLS_SM80[kernel]
        configs = [c for c in mma if _key(c) not in spills]
    budget = (smem_limit(arch) if smem is None else smem) - _SMEM_MARGIN
    itemsize = torch.empty((), dtype=dtype).element_size()
    fits = [c for c in configs if _smem_estimate(c, reduce, itemsize) <= budget]
    if not fits:
        # TF32 on a GPU with little shared memory (sm_86/89: 99 KiB): the narrow fp32 tiles fit.
        fits = [c for c in fp32 if _smem_estimate(c, reduce, itemsize) <= budget]
    return fits


if _INTERPRET:
    _FWD = _BWD_INPUT = _BWD_WEIGHT = [_INTERPRETER_CONFIG]
else:
    _FWD, _BWD_INPUT, _BWD_WEIGHT = ([*mma, *fp32] for mma, fp32, _ in _TABLES.values())


def _pruner(kernel: str, operand: str):
    """early_config_prune: the configs reachable for the operand's dtype and device (reachable_configs),
    then those whose tile along M suits M (a 128-row tile for M = 4 wastes 97% of the work; a 16-row
    tile for M = 8192 never wins). M comes bucketed to a power of two (the autotune key), so every
    M of a bucket gets the same choice."""
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        t = named_args[operand]
        arch, smem = device_arch(t.device)
        fits = reachable_configs(kernel, t.dtype, kwargs["PRECISION"] == "tf32", arch, smem)
        bucket = named_args["M_BUCKET"]
        cap = max(16, bucket)
        floor = 64 if bucket >= 256 else 0
        kept = [c for c in fits if floor <= c.kwargs["BLOCK_M"] <= cap]
        if kept:
            return kept
        if fits:
            return [min(fits, key=lambda c: c.kwargs["BLOCK_M"])]
        raise ValueError(f"{operand.removesuffix('_ptr')}: no {kernel} config fits {smem} B of shared memory "
                         f"(sm_{arch}) for {t.dtype}")
    return prune


# M bucketed to a power of two: every new token count or batch size would otherwise re-run the
# autotuner's timings (variable-length inference sees a new M on most calls).
_KEY = ["M_BUCKET", "N", "K", "PRECISION"]


@triton.jit
def _grouped_tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Program id -> (tile row, tile col), walking GROUP tile rows at a time so that neighbouring
    programs share operand tiles in L2."""
    pid = tl.program_id(0)
    num_r = tl.cdiv(rows, BLOCK_R)
    num_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * num_c
    first_r = (pid // per_group) * GROUP
    group_rows = tl.minimum(num_r - first_r, GROUP)
    pid_r = first_r + (pid % per_group) % group_rows
    pid_c = (pid % per_group) // group_rows
    return pid_r, pid_c


@triton.jit
def _expand_bits(words, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """[ROWS, BLOCK_K//32] int32 words -> [ROWS, BLOCK_K] keep flags (bit j of word w -> column
    32*w + j). The arithmetic shift of a negative word is harmless: & 1 keeps bit j only."""
    shifts = tl.arange(0, 32)
    bits = (words[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(bits, (ROWS, BLOCK_K)) != 0


@triton.jit
def _fwd_tile(
    x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bits_n, stride_bits_w, stride_bias,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """The forward's work for one program (the stacked kernels call it on model s's operands)."""
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP)
    # Rows past the edge wrap around (their results are never stored), so only K needs load masks.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_word = tl.arange(0, BLOCK_K // 32)
    num_words = tl.cdiv(K, 32)

    # int64 along K too: a transposed view of x has stride_xk = M, and BLOCK_K * M passes 2**31 at
    # M ~ 8e6 rows (likewise W's stride_wk = N).
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    bits_ptrs = bits_ptr + offs_n[:, None].to(tl.int64) * stride_bits_n + offs_word[None, :] * stride_bits_w

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        words = tl.load(bits_ptrs, mask=offs_word[None, :] < num_words - kt * (BLOCK_K // 32), other=0)
        w = tl.where(_expand_bits(words, BLOCK_N, BLOCK_K), w, 0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        x_ptrs += x_step
        w_ptrs += w_step
        bits_ptrs += (BLOCK_K // 32) * stride_bits_w

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        acc += bias[None, :].to(acc.dtype)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(configs=_FWD, key=_KEY, prune_configs_by={"early_config_prune": _pruner("fwd", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_linear_fwd_kernel(
    x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bits_n, stride_bits_w, stride_bias,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    _fwd_tile(
        x_ptr, w_ptr, bits_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_bits_n,
        stride_bits_w, stride_bias, stride_ym, stride_yn, HAS_BIAS, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
    )


@triton.jit
def _bwd_input_tile(
    dy_ptr, w_ptr, bits_ptr, dx_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bits_n, stride_bits_w,
    stride_dxm, stride_dxk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dX's work for one program (the stacked kernels call it on model s's operands)."""
    pid_m, pid_k = _grouped_tile(M, K, BLOCK_M, BLOCK_K, GROUP)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)) % K
    offs_n = tl.arange(0, BLOCK_N)
    # Word indices are not wrapped: columns past K read zero words and are never stored.
    offs_word = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    word_ok = offs_word[None, :] < tl.cdiv(K, 32)

    # int64 along N too: a transposed view of dy has stride_dyn = M.
    dy_ptrs = dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :].to(tl.int64) * stride_dyn
    dy_step = tl.cast(stride_dyn, tl.int64) * BLOCK_N
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
        dy_ptrs += dy_step
        w_ptrs += BLOCK_N * stride_wn
        bits_ptrs += BLOCK_N * stride_bits_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dx_ptrs = dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.autotune(configs=_BWD_INPUT, key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("bwd_input", "dy_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_linear_bwd_input_kernel(
    dy_ptr, w_ptr, bits_ptr, dx_ptr,
    M, N, K, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_bits_n, stride_bits_w,
    stride_dxm, stride_dxk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    _bwd_input_tile(
        dy_ptr, w_ptr, bits_ptr, dx_ptr, M, N, K, stride_dym, stride_dyn, stride_wn, stride_wk, stride_bits_n,
        stride_bits_w, stride_dxm, stride_dxk, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
    )


@triton.jit
def _bwd_weight_tile(
    dy_ptr, x_ptr, bits_ptr, dw_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_bits_n, stride_bits_w,
    stride_dwn, stride_dwk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    """dW's work for one program (the stacked kernels call it on model s's operands)."""
    pid_n, pid_k = _grouped_tile(N, K, BLOCK_N, BLOCK_K, GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_word = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    words = tl.load(
        bits_ptr + rows[:, None].to(tl.int64) * stride_bits_n + offs_word[None, :] * stride_bits_w,
        mask=(rows[:, None] < N) & (offs_word[None, :] < tl.cdiv(K, 32)), other=0,
    )
    keep = _expand_bits(words, BLOCK_N, BLOCK_K)
    # A tile with every weight pruned is all zeros whatever dY and X hold: skip its reduction
    # (whole pruned rows and high sparsity make such tiles common).
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


@triton.autotune(configs=_BWD_WEIGHT, key=_KEY,
                 prune_configs_by={"early_config_prune": _pruner("bwd_weight", "x_ptr")})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _masked_linear_bwd_weight_kernel(
    dy_ptr, x_ptr, bits_ptr, dw_ptr,
    M, N, K, M_BUCKET,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_bits_n, stride_bits_w,
    stride_dwn, stride_dwk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):
    _bwd_weight_tile(
        dy_ptr, x_ptr, bits_ptr, dw_ptr, M, N, K, stride_dym, stride_dyn, stride_xm, stride_xk, stride_bits_n,
        stride_bits_w, stride_dwn, stride_dwk, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, GROUP,
    )


# ---- launchers ----------------------------------------------------------------------------------

def _check_matrix(name: str, t: torch.Tensor, rows: int, cols: int, dtype: torch.dtype, device) -> None:
    if t.dim() != 2 or tuple(t.shape) != (rows, cols):
        raise ValueError(f"{name}: expected shape ({rows}, {cols}), got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def _check_first(name: str, t: torch.Tensor, rank: int = 2, dims: str = "") -> None:
    """Checks the tensor that fixes dtype and device for the others (``rank`` dimensions, named
    ``dims`` in the message: the stacked kernels pass 3 and "(models, rows, cols)")."""
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor{f' {dims}' if dims else ''}, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    # The interpreter runs on CPU tensors; compiled Triton needs CUDA memory.
    if not _INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on '{t.device}'")
    # fp64 tiles spill on sm_90 and need 181,760 B of shared memory on sm_80 (an out-of-resources
    # launch): the fp64 path is for the CPU interpreter's tests only, not for GPUs.
    if t.is_cuda and t.dtype == torch.float64:
        raise ValueError(f"{name}: float64 is not supported on CUDA (use float32, or run float64 on the CPU)")


def _check_mask_bits(mask_bits: torch.Tensor, rows: int, cols: int, device) -> None:
    words = triton.cdiv(cols, 32)
    if mask_bits.dtype != torch.int32:
        raise ValueError(f"mask_bits: expected dtype torch.int32, got {mask_bits.dtype}")
    if mask_bits.dim() != 2 or tuple(mask_bits.shape) != (rows, words):
        raise ValueError(
            f"mask_bits: expected shape ({rows}, {words}) = (rows, ceil({cols}/32)), got {tuple(mask_bits.shape)}"
        )
    if mask_bits.device != device:
        raise ValueError(f"mask_bits: expected device {device}, got {mask_bits.device}")


def _on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the one holding the tensors.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def masked_linear_fwd(x: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                      bias: torch.Tensor | None = None, *, allow_tf32: bool = False) -> torch.Tensor:
    """y = x @ (weight * mask)^T + bias.

    x (M, K), weight (N, K), bias (N,) or None: one dtype (fp16, bf16, fp32; fp64 under the
    interpreter only), any strides.
    mask_bits (N, ceil(K/32)) int32. Returns a new contiguous (M, N) tensor in x's dtype.
    allow_tf32 lets fp32 products use TF32 tensor cores.
    """
    _check_first("x", x)
    M, K = x.shape
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (N, K), got shape {tuple(weight.shape)}")
    N = weight.shape[0]
    _check_matrix("weight", weight, N, K, x.dtype, x.device)
    _check_mask_bits(mask_bits, N, K, x.device)
    if bias is not None:
        if tuple(bias.shape) != (N,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(
                f"bias: expected shape ({N},), dtype {x.dtype} on {x.device}, "
                f"got {tuple(bias.shape)}, {bias.dtype} on {bias.device}"
            )
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    with _on_device_of(x):
        _masked_linear_fwd_kernel[grid](
            x, weight, mask_bits, bias if bias is not None else y, y,
            M, N, K, triton.next_power_of_2(M),
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            mask_bits.stride(0), mask_bits.stride(1), bias.stride(0) if bias is not None else 0,
            y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype, allow_tf32),
        )
    return y


def masked_linear_bwd_input(dy: torch.Tensor, weight: torch.Tensor, mask_bits: torch.Tensor,
                            *, allow_tf32: bool = False) -> torch.Tensor:
    """dx = dy @ (weight * mask).

    dy (M, N), weight (N, K): one dtype, any strides; mask_bits (N, ceil(K/32)) int32.
    Returns a new contiguous (M, K) tensor in dy's dtype.
    """
    _check_first("dy", dy)
    M, N = dy.shape
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor (N, K), got shape {tuple(weight.shape)}")
    K = weight.shape[1]
    _check_matrix("weight", weight, N, K, dy.dtype, dy.device)
    _check_mask_bits(mask_bits, N, K, dy.device)
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    with _on_device_of(dy):
        _masked_linear_bwd_input_kernel[grid](
            dy, weight, mask_bits, dx,
            M, N, K, triton.next_power_of_2(M),
            dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
            mask_bits.stride(0), mask_bits.stride(1), dx.stride(0), dx.stride(1),
            PRECISION=_precision(dy.dtype, allow_tf32),
        )
    return dx


def masked_linear_bwd_weight(dy: torch.Tensor, x: torch.Tensor, mask_bits: torch.Tensor,
                             *, allow_tf32: bool = False) -> torch.Tensor:
    """dw = (dy^T @ x) * mask, with exact zeros at pruned positions.

    dy (M, N), x (M, K): one dtype (= the weight's), any strides; mask_bits (N, ceil(K/32)) int32.
    Returns a new contiguous (N, K) tensor in x's dtype.
    """
    _check_first("x", x)
    M, K = x.shape
    if dy.dim() != 2:
        raise ValueError(f"dy: expected a 2-D tensor (M, N), got shape {tuple(dy.shape)}")
    N = dy.shape[1]
    _check_matrix("dy", dy, M, N, x.dtype, x.device)
    _check_mask_bits(mask_bits, N, K, x.device)
    dw = torch.empty((N, K), dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if M == 0:
        return dw.zero_()
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)
    with _on_device_of(x):
        _masked_linear_bwd_weight_kernel[grid](
            dy, x, mask_bits, dw,
            M, N, K, triton.next_power_of_2(M),
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            mask_bits.stride(0), mask_bits.stride(1), dw.stride(0), dw.stride(1),
            PRECISION=_precision(x.dtype, allow_tf32),
        )
    return dw


def tuned_configs() -> dict:
    """The triton.Config each kernel last launched with (None before its first launch), for
    benchmarks to report; str() of one reads "BLOCK_M: 128, BLOCK_N: 256, ..., num_stages: 3"."""
    kernels = {
        "fwd": _masked_linear_fwd_kernel,
        "bwd_input": _masked_linear_bwd_input_kernel,
        "bwd_weight": _masked_linear_bwd_weight_kernel,
    }
    return {name: getattr(k, "best_config", None) for name, k in kernels.items()}
