"""Triton kernels for block_cholesky and block_cholesky_solve: many small SPD systems, one program each.

Shapes: A, L (B, n, n) and b, x (B, n, r), contiguous float32. Program b owns matrix b from start to
end: blocks of n = 32..512 are too small to spread one over a GPU, and batched library routines
are latency-bound at these sizes (the issue's premise); here the whole factorisation (or both
triangular solves) is one launch whatever n, and B independent programs fill the GPU.

Factorisation (``_cholesky_kernel``): a blocked, left-looking Cholesky over BS x BS tiles (BS = 16,
32 or 64; n is padded to a multiple of BS by masking, padded diagonal entries read as 1). For
each block column j, in order:

    S       = A[j, j] + shift I - L[j, :j] L[j, :j]^T              (tl.dot, KC columns at a time)
    L[j, j] and X = L[j, j]^-1, from S by a column loop in registers
    L[i, j] = (A[i, j] - L[i, :j] L[j, :j]^T) X^T       for i > j   (tl.dot)

The factor itself is the only storage: block columns are written to the output L in global
memory and re-read (through L1/L2: n^2 floats, 1 MiB at n = 512) by later ones, so n has no
register limit; registers hold one or two BS x BS tiles and KC-wide dot operands (fp32 dots run
on FMA units, where an operand of K columns costs K registers per row a thread owns: hence
KC = 16). Only the lower triangle of A is read; every element of L is written (zeros above the
diagonal).

The column loop factors S right-looking (column c scaled by 1/sqrt(pivot), the trailing part
of S loses its outer product) and, with several blocks, inverts the factor in the same pass by
forward substitution on a tile X that starts as I. Triton cannot index a register tile, so
columns and rows are extracted with masked sums: a step costs O(BS^2), the loop O(BS^3) per
block column. Row c of X is final at step c; its strictly lower part is stored, transposed, in
the strictly upper triangle of block (j, j) (unused until then, cleared when block column j is
done), from where the products read X^T a KC-row slice at a time; the products' other operand,
A[i, j] - L[i, :j] L[j, :j]^T, likewise goes through its final place in L. Inverting L[j, j] once
turns the panel's n/BS - j - 1 triangular solves into products; the inverse's error is
cond(L[j, j]) eps, the order of substitution's forward error, and damping is how callers keep
blocks well conditioned. With one block (n <= BS) there is no inverse and no product.

Pivots. A pivot that is not > 0 (or NaN) is recorded as info[b] = its 1-based column index (the
order of the first leading minor that is not positive, LAPACK's convention), the first one only;
the factor of that matrix is then meaningless and the caller raises.

Solves (``_cholesky_solve_kernel``): x = A^-1 b = L^-T L^-1 b, by blocked forward then backward
substitution, one program per (matrix, BR columns of b). Off-diagonal blocks are tl.dot updates
from the part of x already solved (written to x and re-read after a barrier); diagonal blocks are
solved by substitution in registers, reading the columns (rows, for L^T) of L[i, i] directly from
global memory, so the solve is backward stable and needs no inverse.

Products use exact fp32 (``input_precision="ieee"``): TF32 rounds operands to 10-bit mantissas,
which would leave a factor's residual near 1e-3.

Synchronisation: within a program, blocks of L (or x) stored by some threads are read by others;
``tl.debug_barrier`` (bar.sync) between a store and the loads that depend on it makes the stores
visible to the whole CTA, and one before a store that overwrites what others may still read.

Limits: any n (int32 offsets within a matrix: n <= 46340, n r < 2^31); B up to 2^31 - 1 programs;
r up to 65535 x 16 (the grid's second axis). One program per matrix suits n up to a few hundred;
for larger blocks cuSOLVER, which spreads one factorisation over the GPU, is the better tool (the
op dispatches there above n = 512).
"""
import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Tile sizes a launcher may use: tl.dot needs every dimension >= 16; at BS = 128 the column loop's
# two tiles alone would take 128 registers a thread at 8 warps.
BLOCKS = (16, 32, 64)
RHS_BLOCKS = (16, 32, 64)
_KC = 16  # contraction slice of every tl.dot: fp32 FMA dot operands hold (rows or columns) x KC values

# Warps per program, by (BS, one block): counts at which ptxas allocates the kernel without spills
# on sm_90a and sm_80 (kernels/aot.py), registers per thread on sm_90 in the comments (one block:
# the column loop only). At 16 warps (512 threads) sm_80 caps a thread at 128 registers, which the
# multi-block BS = 64 factorisation exceeds. Checked by compiling, not yet tuned on a GPU.
_FACTOR_WARPS = {(16, True): 2,    # 40
                 (32, True): 4,    # 55
                 (64, True): 8,    # 103
                 (16, False): 2,   # 142
                 (32, False): 8,   # 167
                 (64, False): 8}   # 238
# Solve warps by (BS, BR). ptxas sometimes aims at fewer registers than the kernel needs and spills
# a few bytes (at 4 warps: (32, 32) on sm_90, (64, 16) on sm_80); these counts do not.
_SOLVE_WARPS = {(16, 16): 2, (16, 32): 2, (16, 64): 2,
                (32, 16): 4, (32, 32): 2, (32, 64): 4,
                (64, 16): 8, (64, 32): 4, (64, 64): 4}


def default_block(n: int) -> int:
    """The tile size for matrices of order n: the whole matrix in one tile when n <= 64 (no inverse,
    no products, no round trip through memory), else 64-wide block columns."""
    return max(16, min(64, triton.next_power_of_2(max(n, 1))))


def default_rhs_block(n_rhs: int) -> int:
    """Columns of b per program: 16, the narrowest tl.dot operand. Wider tiles only save re-reading
    L (from L2) at the price of registers; more programs per matrix fill the GPU sooner."""
    return 16


@triton.jit
def _cholesky_kernel(a_ptr, shift_ptr, l_ptr, info_ptr, n,
                     BS: tl.constexpr, KC: tl.constexpr, ONE_BLOCK: tl.constexpr):
    """L = chol(A[b] + shift[b] I) into l_ptr; info[b] = first failing pivot (1-based) or 0."""
    pid = tl.program_id(0).to(tl.int64)
    a = a_ptr + pid * n * n
    l = l_ptr + pid * n * n
    shift = tl.load(shift_ptr + pid)
    idx = tl.arange(0, BS)
    r = idx[:, None]
    q = idx[None, :]
    kc = tl.arange(0, KC)[None, :]   # columns of a KC-wide slice of L (a dot operand)
    eye = r == q
    info = tl.zeros([1], dtype=tl.int32)
    nb = tl.cdiv(n, BS)
    for j in range(nb):
        j0 = j * BS
        rows_j = j0 + r < n
        cols_j = j0 + q < n
        # S = A[j, j] + shift I - L[j, :j] L[j, :j]^T: lower triangle of A only; padded diagonal
        # entries are 1 so that their pivots are harmless.
        s = tl.load(a + (j0 + r) * n + j0 + q, mask=rows_j & cols_j & (q <= r), other=0.0)
        s += tl.where(eye, tl.where(rows_j, shift, 1.0), 0.0)
        if not ONE_BLOCK:
            for i in range(j):  # blocks above the diagonal in this block column are zero
                tl.store(l + (i * BS + r) * n + j0 + q, tl.zeros([BS, BS], dtype=tl.float32),
                         mask=(i * BS + r < n) & cols_j)
            for k0 in range(0, j0, KC):  # KC columns at a time: dot operands stay small
                ljk = tl.load(l + (j0 + r) * n + k0 + kc, mask=rows_j, other=0.0)
                s -= tl.dot(ljk, tl.trans(ljk), input_precision="ieee")

        # Column loop: L[j, j], stored a column at a time, and (several blocks) its inverse X by
        # forward substitution on a tile that starts as I. Row c of X is final at step c; its
        # strictly lower part goes, transposed, to the strictly upper (unused) triangle of block
        # (j, j), where the products below read X^T a KC-row slice at a time.
        if not ONE_BLOCK:
            x = eye.to(tl.float32)
        for c in range(BS):
            col = tl.sum(tl.where(q == c, s, 0.0), axis=1)       # S[:, c]
            d = tl.sum(tl.where(idx == c, col, 0.0), axis=0)     # the pivot S[c, c]
            fail = ((d > 0.0) == 0) & (j0 + c < n)               # NaN fails too
            info = tl.where(info == 0, tl.where(fail, j0 + c + 1, 0), info)
            root = tl.sqrt_rn(d)
            lc = tl.div_rn(col, root)                            # L[c:, c] (rows >= c)
            below = tl.where(idx > c, lc, 0.0)
            s -= below[:, None] * below[None, :]
            if ONE_BLOCK:
                # Column c of L, with zeros above the diagonal.
                tl.store(l + (j0 + idx) * n + j0 + c, tl.where(idx >= c, lc, 0.0),
                         mask=j0 + tl.maximum(idx, c) < n)
            else:
                tl.store(l + (j0 + idx) * n + j0 + c, lc, mask=(idx >= c) & (j0 + idx < n))
                xc = tl.div_rn(tl.sum(tl.where(r == c, x, 0.0), axis=0), root)  # row c of X, final now
                x = tl.where(r == c, xc[None, :], x - below[:, None] * xc[None, :])
                tl.store(l + (j0 + idx) * n + j0 + c, xc, mask=(idx < c) & (j0 + tl.maximum(idx, c) < n))

        if not ONE_BLOCK:
            tl.debug_barrier()  # X^T in block (j, j) is read by all threads below
            kr = tl.arange(0, KC)[:, None]  # rows of a KC-row slice of X^T
            # L[i, j] = (A[i, j] - L[i, :j] L[j, :j]^T) X^T for the blocks below the diagonal.
            for i in range(j + 1, nb):
                i0 = i * BS
                rows_i = i0 + r < n
                t = tl.load(a + (i0 + r) * n + j0 + q, mask=rows_i & cols_j, other=0.0)
                for k0 in range(0, j0, KC):
                    lik = tl.load(l + (i0 + r) * n + k0 + kc, mask=rows_i, other=0.0)
                    ljk = tl.load(l + (j0 + r) * n + k0 + kc, mask=rows_j, other=0.0)
                    t -= tl.dot(lik, tl.trans(ljk), input_precision="ieee")
                # The product with X^T contracts over all BS columns of t: a register tile cannot
                # be sliced, so t goes through its final place in L and comes back KC columns at a
                # time (dot operands with BS columns would not fit in registers at BS = 64).
                tl.store(l + (i0 + r) * n + j0 + q, t, mask=rows_i & cols_j)
                tl.debug_barrier()
                lij = tl.zeros([BS, BS], dtype=tl.float32)
                for k0 in range(0, BS, KC):
                    # X^T[k0:k0+KC, :]: stored above the diagonal, 1 / L[k, k] on it, zero below.
                    # Block j is full here (it is not the last), so no bounds mask is needed.
                    xt = tl.load(l + (j0 + k0 + kr) * n + j0 + q, mask=q > k0 + kr, other=0.0)
                    diag = tl.load(l + (j0 + k0 + kr) * n + j0 + k0 + kr)
                    xt = tl.where(q == k0 + kr, tl.div_rn(1.0, diag), xt)  # X's own diagonal, 1 / L[c, c]
                    tk = tl.load(l + (i0 + r) * n + j0 + k0 + kc, mask=rows_i, other=0.0)
                    lij += tl.dot(tk, xt, input_precision="ieee")
                tl.debug_barrier()  # every thread has read t before it is overwritten
                tl.store(l + (i0 + r) * n + j0 + q, lij, mask=rows_i & cols_j)
            tl.debug_barrier()  # every thread has read X^T before it is cleared
            tl.store(l + (j0 + r) * n + j0 + q, tl.zeros([BS, BS], dtype=tl.float32),
                     mask=(q > r) & rows_j & cols_j)
            tl.debug_barrier()  # block column j is read by every later one
    tl.store(info_ptr + pid + tl.arange(0, 1), info)


@triton.jit
def _cholesky_solve_kernel(l_ptr, b_ptr, x_ptr, n, n_rhs,
                           BS: tl.constexpr, BR: tl.constexpr, KC: tl.constexpr):
    """x[b][:, cols] = L^-T L^-1 b[b][:, cols] for the BR columns of program (b, t)."""
    pid = tl.program_id(0).to(tl.int64)
    col0 = tl.program_id(1) * BR
    l = l_ptr + pid * n * n
    rhs = b_ptr + pid * n * n_rhs
    out = x_ptr + pid * n * n_rhs
    idx = tl.arange(0, BS)
    r = idx[:, None]
    kc = tl.arange(0, KC)
    qr = tl.arange(0, BR)[None, :]            # columns of a right-hand-side tile
    cols = col0 + qr < n_rhs
    nb = tl.cdiv(n, BS)

    # Forward: L y = b, block row by block row; y goes to out.
    for i in range(nb):
        i0 = i * BS
        rows_i = i0 + r < n
        t = tl.load(rhs + (i0 + r) * n_rhs + col0 + qr, mask=rows_i & cols, other=0.0)
        for k0 in range(0, i0, KC):  # t -= L[i, k0:k0+KC] y[k0:k0+KC]; all of it lies above row i0
            lik = tl.load(l + (i0 + r) * n + k0 + kc[None, :], mask=rows_i, other=0.0)
            yk = tl.load(out + (k0 + kc[:, None]) * n_rhs + col0 + qr, mask=cols, other=0.0)
            t -= tl.dot(lik, yk, input_precision="ieee")
        for c in range(BS):
            lcol = tl.load(l + (i0 + idx) * n + i0 + c, mask=(idx > c) & (i0 + idx < n),
                           other=0.0)  # L[c+1:, c]
            diag = tl.load(l + (i0 + c) * n + i0 + c, mask=i0 + c < n, other=1.0)
            yc = tl.div_rn(tl.sum(tl.where(r == c, t, 0.0), axis=0), diag)
            t = tl.where(r == c, yc[None, :], t - lcol[:, None] * yc[None, :])
        tl.store(out + (i0 + r) * n_rhs + col0 + qr, t, mask=rows_i & cols)
        tl.debug_barrier()

    # Backward: L^T x = y, last block row first; x overwrites y block by block.
    for ii in range(nb):
        i = nb - 1 - ii
        i0 = i * BS
        rows_i = i0 + r < n
        t = tl.load(out + (i0 + r) * n_rhs + col0 + qr, mask=rows_i & cols, other=0.0)
        for k0 in range(i0 + BS, n, KC):  # t -= L[k0:k0+KC, i]^T x[k0:k0+KC]
            in_k = k0 + kc < n
            lki = tl.load(l + (k0 + kc[None, :]) * n + i0 + r, mask=in_k[None, :] & rows_i, other=0.0)
            xk = tl.load(out + (k0 + kc[:, None]) * n_rhs + col0 + qr, mask=in_k[:, None] & cols, other=0.0)
            t -= tl.dot(lki, xk, input_precision="ieee")
        for cc in range(BS):
            c = BS - 1 - cc
            lrow = tl.load(l + (i0 + c) * n + i0 + idx, mask=(idx < c) & (i0 + tl.maximum(idx, c) < n),
                           other=0.0)  # L[c, :c]
            diag = tl.load(l + (i0 + c) * n + i0 + c, mask=i0 + c < n, other=1.0)
            xc = tl.div_rn(tl.sum(tl.where(r == c, t, 0.0), axis=0), diag)
            t = tl.where(r == c, xc[None, :], t - lrow[:, None] * xc[None, :])
        tl.debug_barrier()  # every thread has read y[i] before any overwrites it
        tl.store(out + (i0 + r) * n_rhs + col0 + qr, t, mask=rows_i & cols)
        tl.debug_barrier()


# ---- launchers -----------------------------------------------------------------------------------

def _on_device_of(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the one holding the tensors.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_tensor(name: str, t: torch.Tensor, shape: tuple, device: Optional[torch.device] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype torch.float32 (the Triton kernels are fp32 only), got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    # The interpreter runs on CPU tensors; compiled Triton needs CUDA memory.
    if not _INTERPRET and t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got a tensor on '{t.device}'")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")


# Offsets within one matrix (and within one b) are int32.
MAX_ELEMENTS = 2**31 - 1


def _check_size(name: str, rows: int, cols: int) -> None:
    if rows * cols > MAX_ELEMENTS:
        raise ValueError(f"{name}: expected at most {MAX_ELEMENTS} elements per matrix (int32 offsets), "
                         f"got {rows} x {cols}")


def _check_block(name: str, block: int, allowed: tuple) -> None:
    if block not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {block!r}")


def block_cholesky_fwd(a: torch.Tensor, shift: torch.Tensor, *, block: Optional[int] = None,
                       out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factors of a[b] + shift[b] I, for every b.

    a: (B, n, n) contiguous float32, symmetric positive definite (only its lower triangle is read).
    shift: (B,) float32, added to each matrix's diagonal (damping).
    block: tile size in BLOCKS (default ``default_block(n)``).
    out: optional (B, n, n) float32 contiguous buffer for L (every element is written).
    Returns (L, info): L (B, n, n) lower triangular with zeros above the diagonal; info (B,) int32,
    0 where the factorisation succeeded, else the 1-based index of the first pivot that was not
    > 0 (L[b] is then meaningless). No host synchronisation.
    """
    if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"a: expected a tensor of shape (B, n, n), got "
                         f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    batch, n, _ = a.shape
    _check_tensor("a", a, (batch, n, n))
    _check_tensor("shift", shift, (batch,), a.device)
    _check_size("a", n, n)
    block = default_block(n) if block is None else block
    _check_block("block", block, BLOCKS)
    if out is None:
        out = torch.empty_like(a)
    else:
        _check_tensor("out", out, (batch, n, n), a.device)
    info = torch.zeros(batch, dtype=torch.int32, device=a.device)
    if batch == 0 or n == 0:
        return out, info
    with _on_device_of(a):
        _cholesky_kernel[(batch,)](a, shift, out, info, n, BS=block, KC=_KC, ONE_BLOCK=n <= block,
                                   num_warps=_FACTOR_WARPS[block, n <= block], num_stages=1)
    return out, info


def block_cholesky_solve_fwd(l: torch.Tensor, b: torch.Tensor, *, block: Optional[int] = None,
                             rhs_block: Optional[int] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x[b] = (L[b] L[b]^T)^-1 b[b] for every b.

    l: (B, n, n) contiguous float32 lower Cholesky factors (only the lower triangle is read; the
    diagonal must be nonzero). b: (B, n, r) contiguous float32.
    block / rhs_block: tile sizes along n (BLOCKS) and along r (RHS_BLOCKS).
    out: optional (B, n, r) float32 contiguous buffer for x (every element is written).
    Returns x (B, n, r).
    """
    if not isinstance(l, torch.Tensor) or l.dim() != 3 or l.shape[1] != l.shape[2]:
        raise ValueError(f"l: expected a tensor of shape (B, n, n), got "
                         f"{tuple(l.shape) if isinstance(l, torch.Tensor) else type(l).__name__}")
    batch, n, _ = l.shape
    _check_tensor("l", l, (batch, n, n))
    if not isinstance(b, torch.Tensor) or b.dim() != 3:
        raise ValueError(f"b: expected a tensor of shape ({batch}, {n}, r), got "
                         f"{tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__}")
    n_rhs = b.shape[2]
    _check_tensor("b", b, (batch, n, n_rhs), l.device)
    _check_size("l", n, n)
    _check_size("b", n, n_rhs)
    block = default_block(n) if block is None else block
    rhs_block = default_rhs_block(n_rhs) if rhs_block is None else rhs_block
    _check_block("block", block, BLOCKS)
    _check_block("rhs_block", rhs_block, RHS_BLOCKS)
    if out is None:
        out = torch.empty_like(b)
    else:
        _check_tensor("out", out, (batch, n, n_rhs), l.device)
    if out.numel() == 0:
        return out
    if triton.cdiv(n_rhs, rhs_block) > 65535:
        raise ValueError(f"b: expected at most {65535 * rhs_block} right-hand sides per block (65535 programs of "
                         f"{rhs_block} columns), got {n_rhs}")
    grid = (batch, triton.cdiv(n_rhs, rhs_block))
    with _on_device_of(l):
        _cholesky_solve_kernel[grid](l, b, out, n, n_rhs, BS=block, BR=rhs_block, KC=_KC,
                                     num_warps=_SOLVE_WARPS[block, rhs_block], num_stages=1)
    return out
