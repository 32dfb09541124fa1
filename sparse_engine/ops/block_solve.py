"""``sparse_engine::block_cholesky`` and ``sparse_engine::block_cholesky_solve``: many small SPD
systems at once, the inner step of layer-wise OBS (the Cholesky of each block's inverse Hessian)
and of CHITA (backsolves on a support, block by block).

    L = block_cholesky(A, damp)          L[b] L[b]^T = A[b] + damp * mean(diag(A[b])) * I
    x = block_cholesky_solve(L, b)       x[b] = (L[b] L[b]^T)^-1 b[b]
    x = block_solve(A, b, damp)          both

A is a batch (B, n, n) of symmetric positive definite blocks; only its lower triangle is read.
Damping adds ``damp`` times the block's mean diagonal to its diagonal (SparseGPT's rule: the shift
follows each block's scale, so one ``damp`` serves blocks of any magnitude). A block that is not
positive definite after damping (a pivot <= 0, or NaN/inf reaching a pivot) raises ValueError
naming the block, with the order of its first failing leading minor: the remedy is a larger damp.

Kernels: CPU, ``torch.linalg`` (LAPACK's blocked potrf/potrs over the batch). CUDA: float32 blocks
with n <= TRITON_MAX_N go to the Triton kernels of ``kernels/block_solve.py`` (one program per
block, the whole factorisation in one launch); float64, and blocks above TRITON_MAX_N (where a
single block is big enough for cuSOLVER to spread over the GPU), go to ``torch.linalg`` (cuSOLVER).
Raising needs the failure flags on the host: one synchronisation per factorisation, as
``torch.linalg.cholesky`` does.

Not differentiable: these are solver steps of pruning algorithms, not layers. Backward through
them raises a RuntimeError that says so.
"""
import math

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64)
TRITON_MAX_N = 512


# ---- public API ------------------------------------------------------------------------------------

def _check_batch(name: str, t, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name}: expected dtype float32 or float64, got {t.dtype}")
    if t.dim() != 3 or t.shape[1] != t.shape[2]:
        raise ValueError(f"{name}: expected {what} of shape (B, n, n), got {tuple(t.shape)}")


def _check_damp(damp) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp: expected a finite number >= 0 (a fraction of each block's mean diagonal), "
                         f"got {damp!r}")
    return float(damp)


def block_cholesky(A: Tensor, damp: float = 0.0) -> Tensor:
    """Lower Cholesky factors of a batch of SPD blocks, damped.

    Args:
        A: ``(B, n, n)`` float32 or float64, symmetric positive definite; only the lower triangle
            is read; any strides.
        damp: ``>= 0``; ``damp * mean(diag(A[b]))`` is added to the diagonal of block b.
    Returns:
        ``L`` ``(B, n, n)``, same dtype and device, lower triangular (zeros above the diagonal),
        with ``L[b] @ L[b].mT == A[b] + damp * mean(diag(A[b])) * I``.
    Raises:
        ValueError naming block b if it is not positive definite after damping.
    """
    _check_batch("A", A, "a batch of square blocks")
    return torch.ops.sparse_engine.block_cholesky(A, _check_damp(damp))


def block_cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    """``x[b] = (L[b] L[b]^T)^-1 b[b]`` from the factors of :func:`block_cholesky`.

    Args:
        L: ``(B, n, n)`` float32 or float64 lower Cholesky factors (only the lower triangle is read).
        b: ``(B, n, r)`` or ``(B, n)`` (one right-hand side per block), same dtype and device.
    Returns:
        ``x`` of ``b``'s shape.
    """
    _check_batch("L", L, "a batch of lower-triangular factors")
    if not isinstance(b, Tensor):
        raise TypeError(f"b: expected a torch.Tensor, got {type(b).__name__}")
    batch, n = L.shape[0], L.shape[1]
    if b.dim() not in (2, 3) or b.shape[0] != batch or b.shape[1] != n:
        raise ValueError(f"b: expected shape ({batch}, {n}, r) or ({batch}, {n}) (L is {tuple(L.shape)}), "
                         f"got {tuple(b.shape)}")
    if b.dtype != L.dtype:
        raise TypeError(f"b: expected dtype {L.dtype} (that of L), got {b.dtype}")
    if b.device != L.device:
        raise ValueError(f"b: expected a tensor on {L.device} (the device of L), got {b.device}")
    if b.dim() == 2:
        return torch.ops.sparse_engine.block_cholesky_solve(L, b.unsqueeze(-1)).squeeze(-1)
    return torch.ops.sparse_engine.block_cholesky_solve(L, b)


def block_solve(A: Tensor, b: Tensor, damp: float = 0.0) -> Tensor:
    """``x[b] = (A[b] + damp * mean(diag(A[b])) * I)^-1 b[b]``: :func:`block_cholesky` then
    :func:`block_cholesky_solve` (shapes and errors as theirs)."""
    return block_cholesky_solve(block_cholesky(A, damp), b)


# ---- references ------------------------------------------------------------------------------------

def block_cholesky_ref(A: Tensor, damp: float = 0.0) -> Tensor:
    """Readable reference (run it in float64): the textbook column-by-column Cholesky-Crout
    recurrence over the batch, from the lower triangle of A; NaN where a pivot is not positive."""
    A = torch.tril(A)
    n = A.shape[-1]
    diag = A.diagonal(dim1=-2, dim2=-1)
    shift = damp * diag.mean(-1) if n else diag.sum(-1)
    L = torch.zeros_like(A)
    for j in range(n):
        pivot = A[:, j, j] + shift - (L[:, j, :j] ** 2).sum(-1)
        root = torch.where(pivot > 0, pivot, torch.nan).sqrt()
        L[:, j, j] = root
        below = A[:, j + 1:, j] - (L[:, j + 1:, :j] @ L[:, j, :j, None]).squeeze(-1)
        L[:, j + 1:, j] = below / root[:, None]
    return L


def block_cholesky_solve_ref(L: Tensor, b: Tensor) -> Tensor:
    """Readable reference (run it in float64): forward substitution L y = b, then backward
    substitution L^T x = y, a row at a time over the batch."""
    L = torch.tril(L)
    n = L.shape[-1]
    y = torch.zeros_like(b)
    for i in range(n):
        y[:, i] = (b[:, i] - (L[:, i, :i, None] * y[:, :i]).sum(1)) / L[:, i, i, None]
    x = torch.zeros_like(b)
    for i in reversed(range(n)):
        x[:, i] = (y[:, i] - (L[:, i + 1:, i, None] * x[:, i + 1:]).sum(1)) / L[:, i, i, None]
    return x


# ---- failures ----------------------------------------------------------------------------------------

def _shift(A: Tensor, damp: float) -> Tensor:
    """Per-block diagonal shift damp * mean(diag(A[b])), shape (B,)."""
    if damp == 0.0 or A.shape[-1] == 0:
        return A.new_zeros(A.shape[0])
    return damp * A.diagonal(dim1=-2, dim2=-1).mean(-1)


def _raise_if_failed(L: Tensor, info: Tensor, A: Tensor, damp: float) -> None:
    """ValueError naming the first block whose factorisation failed: info != 0, or a non-finite
    diagonal (some LAPACK builds, OpenBLAS's potf2 among them, let a NaN pivot through; a NaN or
    inf anywhere in a block's lower triangle reaches a later pivot, so the diagonal is enough).
    The diagonal's sum is finite iff its entries are: they are square roots of pivots, far from
    overflowing when added. One reduction and one synchronisation, as few small ops as possible:
    on a busy CPU each parallel region can wait for a descheduled thread."""
    bad = (info != 0) | ~torch.isfinite(L.diagonal(dim1=-2, dim2=-1).sum(-1))
    failed = bad.nonzero().flatten()
    if failed.numel() == 0:  # the one synchronisation
        return
    first = int(failed[0])
    order = int(info[first])
    shift = float(_shift(A[first:first + 1], damp)[0])
    where = (f"its leading minor of order {order} is not positive" if order > 0 else
             "its factor is not finite (NaN or inf in the block's lower triangle)")
    others = f" ({failed.numel() - 1} more blocks failed)" if failed.numel() > 1 else ""
    raise ValueError(f"A[{first}]: block {first} is not positive definite after damping (damp={damp:g}, "
                     f"{shift:.6g} added to its diagonal): {where}{others}; use a larger damp")


def _cholesky_torch(A: Tensor, damp: float) -> Tensor:
    damped = A
    if damp != 0.0:
        damped = A.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(_shift(A, damp)[:, None])
    # The upper factor of A^T, from A^T's upper triangle (A's lower one): LAPACK stores it column-major,
    # so its transpose L comes back row-major contiguous, like the Triton kernel's, without a copy.
    U, info = torch.linalg.cholesky_ex(damped.mT, upper=True)
    L = U.mT
    _raise_if_failed(L, info, A, damp)
    return L


# ---- block_cholesky ----------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::block_cholesky", mutates_args=())
def _block_cholesky(A: Tensor, damp: float) -> Tensor:
    raise NotImplementedError(f"sparse_engine::block_cholesky has no kernel for device '{A.device.type}'")


@_block_cholesky.register_kernel("cpu")
def _(A, damp):
    return _cholesky_torch(A, damp)


@_block_cholesky.register_kernel("cuda")
def _(A, damp):
    if A.dtype != torch.float32 or A.shape[-1] > TRITON_MAX_N:
        return _cholesky_torch(A, damp)
    from sparse_engine.kernels.block_solve import block_cholesky_fwd
    L, info = block_cholesky_fwd(A.contiguous(), _shift(A, damp))
    _raise_if_failed(L, info, A, damp)
    return L


@_block_cholesky.register_fake
def _(A, damp):
    return torch.empty_like(A, memory_format=torch.contiguous_format)


# ---- block_cholesky_solve ------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::block_cholesky_solve", mutates_args=())
def _block_cholesky_solve(L: Tensor, b: Tensor) -> Tensor:
    raise NotImplementedError(f"sparse_engine::block_cholesky_solve has no kernel for device '{L.device.type}'")


def _solve_torch(L: Tensor, b: Tensor) -> Tensor:
    # LAPACK and cuSOLVER want column-major factors: a row-major L (block_cholesky's) is, read as
    # L^T, a column-major upper factor, which they take without a copy. x comes back column-major;
    # the copy to row-major (the fake's layout) is O(n r) against the solve's O(n^2 r).
    if L.is_contiguous():
        x = torch.cholesky_solve(b, L.mT, upper=True)
    else:
        x = torch.cholesky_solve(b, L)
    return x.contiguous()


@_block_cholesky_solve.register_kernel("cpu")
def _(L, b):
    return _solve_torch(L, b)


@_block_cholesky_solve.register_kernel("cuda")
def _(L, b):
    if L.dtype != torch.float32 or L.shape[-1] > TRITON_MAX_N:
        return _solve_torch(L, b)
    from sparse_engine.kernels.block_solve import block_cholesky_solve_fwd
    return block_cholesky_solve_fwd(L.contiguous(), b.contiguous())


@_block_cholesky_solve.register_fake
def _(L, b):
    return torch.empty_like(b, memory_format=torch.contiguous_format)


# ---- no autograd ---------------------------------------------------------------------------------

def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"sparse_engine::{name} is not differentiable (a solver step of OBS/CHITA "
                           f"pruning): call it on detached tensors or under torch.no_grad()")
    return backward


_block_cholesky.register_autograd(_not_differentiable("block_cholesky"))
_block_cholesky_solve.register_autograd(_not_differentiable("block_cholesky_solve"))
