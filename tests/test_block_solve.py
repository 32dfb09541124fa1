"""block_cholesky / block_cholesky_solve (sparse_engine/ops/block_solve.py) and their Triton kernels
(kernels/block_solve.py), against the float64 references of the op module.

The Triton launchers are called directly (through the op, dispatch would pick the CPU kernel); on
a machine without a GPU they run under TRITON_INTERPRET=1 on CPU tensors, fp32, tiny n, with
BS = 16 tiles so that n = 33 spans three block columns (padding, products, the inverse of the
diagonal blocks and the barriers' store/reload paths all run).

Tolerances:
- Cholesky, backward error (the textbook bound, Higham Thm 10.3, with twice its constant):
  |L L^T - A_damped| <= (n + 2) eps |L| |L|^T elementwise; one wrong entry of L breaks it.
- Forward errors against the float64 reference: at most 4x torch's own error in the same dtype
  on the same input, plus one ulp of the largest value. Not flash-attention's 2x: a blocked
  factorisation sums in another order than LAPACK's, and measured ratios reach ~3 on single inputs.
- float64 paths: the backward bound above, in float64.
"""
import pytest
import torch

from sparse_engine.kernels import block_solve as kernel
from sparse_engine.kernels.block_solve import block_cholesky_fwd, block_cholesky_solve_fwd
from sparse_engine.ops.block_solve import (block_cholesky, block_cholesky_ref, block_cholesky_solve,
                                           block_cholesky_solve_ref, block_solve)

fp32, fp64 = torch.float32, torch.float64
NAMES = {fp32: "fp32", fp64: "fp64"}
DTYPES = pytest.mark.parametrize("dtype", [fp32, fp64], ids=NAMES.get)


# ---- inputs and checks ---------------------------------------------------------------------------

def spd(batch: int, n: int, dtype=fp64, device="cpu", scale=None) -> torch.Tensor:
    """Well-conditioned SPD blocks: G G^T / m + 0.1 I (Wishart, condition number ~ 50), each block
    scaled by its own factor so that damping must use the block's own diagonal."""
    m = n + 8
    g = torch.randn(batch, n, m, dtype=fp64)
    a = g @ g.mT / m + 0.1 * torch.eye(n, dtype=fp64)
    scale = torch.logspace(-2, 2, batch, dtype=fp64) if scale is None else scale
    return (a * scale[:, None, None]).to(dtype).to(device)


def damped64(a: torch.Tensor, damp: float) -> torch.Tensor:
    a = torch.tril(a.double())
    a = a + torch.tril(a, -1).mT
    return a + damp * a.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(a.shape[-1], dtype=fp64)


def with_failing_minor(a: torch.Tensor, order: int) -> torch.Tensor:
    """A copy of SPD block a (float64) whose leading minors are positive up to order - 1 and whose
    pivot `order` (1-based) is -1: the diagonal entry at order - 1 loses its Schur complement + 1."""
    a = a.clone()
    k = order - 1
    schur = a[k, k] - a[k, :k] @ torch.linalg.solve(a[:k, :k], a[:k, k]) if k else a[0, 0]
    a[k, k] -= schur + 1
    return a


def assert_cholesky(L: torch.Tensor, a_damped64: torch.Tensor, dtype: torch.dtype) -> None:
    """Lower triangular with exact zeros above the diagonal, and the backward error bound."""
    n = a_damped64.shape[-1]
    assert L.shape == a_damped64.shape and L.dtype == dtype
    assert torch.isfinite(L).all(), "non-finite entries in L"
    assert (torch.triu(L, 1) == 0).all(), "nonzero entries above the diagonal"
    L64 = L.double().cpu()
    residual = (L64 @ L64.mT - a_damped64).abs()
    bound = (n + 2) * torch.finfo(dtype).eps * (L64.abs() @ L64.abs().mT)
    excess = residual - bound
    assert (excess <= 0).all(), f"|L L^T - A| exceeds (n+2) eps |L||L^T| by {excess.max().item():.3g}"


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, dtype: torch.dtype) -> None:
    """Forward error at most 4x torch's own in `dtype`, plus one ulp of the largest value."""
    err = (out.double().cpu() - ref64).abs().max().item()
    base = (lowp.double().cpu() - ref64).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref64.abs().max().item()
    assert err <= 4 * base + ulp, f"error {err:.3g} vs torch's own {base:.3g} in {dtype} (ulp {ulp:.3g})"


# ---- references against torch (so that the references can be trusted) ----------------------------

def test_references_match_torch_float64():
    a = spd(3, 11)
    L = block_cholesky_ref(a, 0.02)
    torch.testing.assert_close(L, torch.linalg.cholesky(damped64(a, 0.02)), rtol=0, atol=1e-12)
    b = torch.randn(3, 11, 4, dtype=fp64)
    torch.testing.assert_close(block_cholesky_solve_ref(L, b), torch.cholesky_solve(b, L), rtol=0, atol=1e-9)


# ---- the op on CPU --------------------------------------------------------------------------------

@pytest.mark.parametrize("damp", [0.0, 0.01], ids=["damp0", "damp0.01"])
@pytest.mark.parametrize("n", [1, 7, 33, 97])
@DTYPES
def test_cholesky_cpu(dtype, n, damp):
    a = spd(4, n, dtype)
    L = block_cholesky(a, damp)
    assert L.is_contiguous()
    target = damped64(a, damp)
    assert_cholesky(L, target, dtype)
    if dtype == fp32:
        lowp = torch.linalg.cholesky(target.float())
        assert_close_to_ref(L, block_cholesky_ref(a.double(), damp), lowp, dtype)
    else:
        torch.testing.assert_close(L, block_cholesky_ref(a, damp), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rhs", [(5,), (1,), ()], ids=["r5", "r1", "vector"])
@pytest.mark.parametrize("n", [1, 7, 33])
@DTYPES
def test_cholesky_solve_cpu(dtype, n, rhs):
    a = spd(3, n, dtype)
    b = torch.randn(3, n, *rhs, dtype=dtype)
    L = block_cholesky(a)
    x = block_cholesky_solve(L, b)
    assert x.shape == b.shape and x.dtype == dtype and x.is_contiguous()
    ref = block_cholesky_solve_ref(L.double(), b.double().reshape(3, n, -1)).reshape(b.shape)
    if dtype == fp32:
        assert_close_to_ref(x, ref, torch.cholesky_solve(b.reshape(3, n, -1), L).reshape(b.shape), dtype)
    else:
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-10 * ref.abs().max().item())
    torch.testing.assert_close(block_solve(a, b), x, rtol=0, atol=0)


def test_cpu_reads_lower_triangles_and_any_strides():
    a = spd(3, 9)
    garbage = torch.tril(a) + torch.triu(torch.full_like(a, float("nan")), 1)
    L = block_cholesky(garbage, 0.01)
    torch.testing.assert_close(L, block_cholesky(a, 0.01), rtol=0, atol=0)
    L_nan = L + torch.triu(torch.full_like(L, float("nan")), 1)
    b = torch.randn(3, 5, 9, dtype=fp64).mT  # non-contiguous right-hand sides
    for layout in (L_nan, L_nan.mT.contiguous().mT):  # row-major (block_cholesky's), column-major (LAPACK's)
        torch.testing.assert_close(block_cholesky_solve(layout, b), block_cholesky_solve_ref(L, b), rtol=0, atol=1e-10)


def test_empty_batches():
    assert block_cholesky(torch.empty(0, 4, 4)).shape == (0, 4, 4)
    assert block_cholesky(torch.empty(3, 0, 0), 0.1).shape == (3, 0, 0)
    assert block_cholesky_solve(torch.empty(0, 4, 4), torch.empty(0, 4, 2)).shape == (0, 4, 2)
    assert block_cholesky_solve(torch.eye(4).expand(2, 4, 4), torch.empty(2, 4, 0)).shape == (2, 4, 0)


# ---- damping and failures --------------------------------------------------------------------------

def test_damping_adds_a_fraction_of_each_blocks_mean_diagonal():
    a = spd(3, 6, scale=torch.tensor([1e-3, 1.0, 1e3], dtype=fp64))
    for damp in (0.5, 2.0):
        shift = damp * a.diagonal(dim1=-2, dim2=-1).mean(-1)
        expected = torch.linalg.cholesky(a + shift[:, None, None] * torch.eye(6, dtype=fp64))
        torch.testing.assert_close(block_cholesky(a, damp), expected, rtol=1e-12, atol=0)


@DTYPES
def test_damping_factors_ill_conditioned_and_singular_blocks(dtype):
    n = 24
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=fp64))
    ill = q @ torch.diag(torch.logspace(0, -14, n, dtype=fp64)) @ q.T  # condition 1e14
    dead = spd(1, n)[0]
    dead[5, :] = 0
    dead[:, 5] = 0  # an input that is always zero: a zero row and column, as SparseGPT meets them
    good = spd(1, n)[0]
    with pytest.raises(ValueError, match=r"A\[2\]: block 2 is not positive definite .*order 6"):
        block_cholesky(torch.stack([good, good, dead]).to(dtype))
    a = torch.stack([good, ill, dead]).to(dtype)
    L = block_cholesky(a, 0.01)
    target = damped64(a, 0.01)
    assert_cholesky(L, target, dtype)
    b = torch.randn(3, n, 2, dtype=dtype)
    x = block_cholesky_solve(L, b)
    exact = torch.linalg.solve(target, b.double())
    # damped condition number <= (max eig + shift) / shift ~ 1/damp * n: a few hundred
    cond = torch.linalg.cond(target).max().item()
    assert cond < 1e4
    assert ((x.double() - exact).norm() / exact.norm()).item() <= 10 * cond * torch.finfo(dtype).eps


@pytest.mark.parametrize("order", [1, 4, 20])
@DTYPES
def test_not_positive_definite_names_the_block(dtype, order):
    a = spd(5, 20)
    a[3] = with_failing_minor(a[3], order)
    with pytest.raises(ValueError, match=rf"A\[3\]: block 3 is not positive definite after damping "
                                         rf"\(damp=0, .*leading minor of order {order} is not positive"):
        block_cholesky(a.to(dtype))
    with pytest.raises(ValueError, match=r"A\[3\]"):
        block_solve(a.to(dtype), torch.randn(5, 20, dtype=dtype))


def test_several_failures_name_the_first_and_count_the_rest():
    a = spd(6, 8)
    for i in (1, 2, 4):
        a[i] = with_failing_minor(a[i], 3)
    with pytest.raises(ValueError, match=r"A\[1\].*order 3 is not positive \(2 more blocks failed\)"):
        block_cholesky(a)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_lower_triangle_is_an_error(value):
    a = spd(3, 8, fp32)
    a[2, 6, 3] = value
    with pytest.raises(ValueError, match=r"A\[2\]: block 2 is not positive definite"):
        block_cholesky(a, 0.01)


# ---- argument errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, error, message", [
    (torch.eye(3), ValueError, r"A: expected a batch of square blocks of shape \(B, n, n\), got \(3, 3\)"),
    (torch.zeros(2, 3, 4), ValueError, r"A: expected .*\(B, n, n\), got \(2, 3, 4\)"),
    (torch.eye(3, dtype=torch.float16)[None], TypeError, r"A: expected dtype float32 or float64, got torch.float16"),
    (torch.eye(3, dtype=torch.int64)[None], TypeError, r"A: expected dtype float32 or float64"),
    ([[1.0]], TypeError, r"A: expected a torch.Tensor, got list"),
], ids=["2d", "not-square", "fp16", "int64", "list"])
def test_cholesky_argument_errors(bad, error, message):
    with pytest.raises(error, match=message):
        block_cholesky(bad)


@pytest.mark.parametrize("damp", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_damp_errors(damp):
    with pytest.raises(ValueError, match=r"damp: expected a finite number >= 0"):
        block_cholesky(spd(1, 3), damp)


def test_solve_argument_errors():
    L = block_cholesky(spd(2, 5))
    cases = [
        (L, torch.randn(2, 4, 1, dtype=fp64), ValueError, r"b: expected shape \(2, 5, r\) or \(2, 5\)"),
        (L, torch.randn(3, 5, 1, dtype=fp64), ValueError, r"b: expected shape \(2, 5, r\)"),
        (L, torch.randn(2, 5, 1, 1, dtype=fp64), ValueError, r"b: expected shape"),
        (L, torch.randn(2, 5, 1), TypeError, r"b: expected dtype torch.float64 \(that of L\), got torch.float32"),
        (L, torch.randn(2, 5, 1, dtype=fp64, device="meta"), ValueError, r"b: expected a tensor on cpu"),
        (L, [1.0], TypeError, r"b: expected a torch.Tensor"),
        (L[0], torch.randn(5, 1, dtype=fp64), ValueError, r"L: expected a batch of lower-triangular factors"),
    ]
    for L_, b, error, message in cases:
        with pytest.raises(error, match=message):
            block_cholesky_solve(L_, b)


def test_not_differentiable():
    a = spd(2, 4).requires_grad_()
    L = block_cholesky(a, 0.01)
    with pytest.raises(RuntimeError, match=r"sparse_engine::block_cholesky is not differentiable"):
        L.sum().backward()
    b = torch.randn(2, 4, 1, dtype=fp64, requires_grad=True)
    x = block_cholesky_solve(L.detach(), b)
    with pytest.raises(RuntimeError, match=r"sparse_engine::block_cholesky_solve is not differentiable"):
        x.sum().backward()


# ---- torch.library and torch.compile ---------------------------------------------------------------

@DTYPES
def test_opcheck(dtype):
    a = spd(3, 6, dtype)
    torch.library.opcheck(torch.ops.sparse_engine.block_cholesky.default, (a, 0.01))
    L = block_cholesky(a, 0.01)
    torch.library.opcheck(torch.ops.sparse_engine.block_cholesky_solve.default, (L, torch.randn(3, 6, 2, dtype=dtype)))


def test_compile_fullgraph():
    a, b = spd(3, 6, fp32), torch.randn(3, 6, 2)
    solve = torch.compile(lambda a, b: block_solve(a * 2, b, damp=0.01) + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(solve(a, b), block_solve(a * 2, b, damp=0.01) + 1)


# ---- Triton launchers (interpreter on CPU, compiled on a GPU) ---------------------------------------

@pytest.mark.parametrize("n, block", [(1, None), (5, None), (16, 16), (33, 16), (33, None), (40, 32), (70, None)],
                         ids=["n1", "n5", "n16-BS16", "n33-BS16", "n33-BS64", "n40-BS32", "n70-BS64"])
def test_triton_cholesky(triton_device, n, block):
    a = spd(3, n, fp32, triton_device)
    shift = 0.05 * a.diagonal(dim1=-2, dim2=-1).mean(-1)
    # Poisoned output, and NaN above A's diagonal: the kernel reads only the lower triangle and
    # writes every element of L.
    a_upper_nan = torch.tril(a) + torch.triu(torch.full_like(a, float("nan")), 1)
    out = torch.full_like(a, float("nan"))
    L, info = block_cholesky_fwd(a_upper_nan, shift, block=block, out=out)
    assert L.data_ptr() == out.data_ptr() and info.dtype == torch.int32
    assert info.tolist() == [0, 0, 0]
    target = damped64(a.cpu(), 0.05)
    assert_cholesky(L, target, fp32)
    assert_close_to_ref(L, block_cholesky_ref(a.double().cpu(), 0.05), torch.linalg.cholesky(target.float()), fp32)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("n, block, order", [(5, None, 3), (33, 16, 1), (33, 16, 20), (33, 16, 33)],
                         ids=["n5-pivot3", "n33-pivot1", "n33-pivot20", "n33-pivot33"])
def test_triton_cholesky_reports_the_first_failing_pivot(triton_device, n, block, order):
    a = spd(3, n)
    a[1] = with_failing_minor(a[1], order)
    a[2, n - 1, 0] = float("nan")  # reaches the last pivot
    _, info = block_cholesky_fwd(a.float().to(triton_device), torch.zeros(3, device=triton_device), block=block)
    assert info.tolist() == [0, order, n]


SOLVE_CASES = [(n, block, r) for n, block in [(1, None), (5, None), (16, 16), (33, 16), (33, None)] for r in (1, 17)]
# n70: two 64-wide blocks; n40-BS32-r33: three programs of 16 columns per matrix, the last partial
SOLVE_CASES += [(70, None, 20), (40, 32, 33)]


@pytest.mark.parametrize("n, block, n_rhs", SOLVE_CASES,
                         ids=[f"n{n}-BS{b or kernel.default_block(n)}-r{r}" for n, b, r in SOLVE_CASES])
def test_triton_cholesky_solve(triton_device, n, block, n_rhs):
    L = torch.linalg.cholesky(spd(2, n)).float()
    b = torch.randn(2, n, n_rhs)
    # NaN above L's diagonal: the kernel reads only the lower triangle.
    L_dev = (L + torch.triu(torch.full_like(L, float("nan")), 1)).contiguous().to(triton_device)
    out = torch.full((2, n, n_rhs), float("nan"), device=triton_device)
    x = block_cholesky_solve_fwd(L_dev, b.to(triton_device), block=block, out=out)
    assert x.data_ptr() == out.data_ptr()
    ref = block_cholesky_solve_ref(L.double(), b.double())
    assert torch.isfinite(x).all()
    assert_close_to_ref(x, ref, torch.cholesky_solve(b, L), fp32)


def test_triton_launcher_errors(triton_device):
    a = spd(2, 5, fp32, triton_device)
    shift = torch.zeros(2, device=triton_device)
    with pytest.raises(ValueError, match=r"a: expected dtype torch.float32 \(the Triton kernels are fp32 only\)"):
        block_cholesky_fwd(a.double(), shift)
    with pytest.raises(ValueError, match=r"a: expected a contiguous tensor"):
        block_cholesky_fwd(a.mT, shift)
    with pytest.raises(ValueError, match=r"shift: expected shape \(2,\), got \(3,\)"):
        block_cholesky_fwd(a, torch.zeros(3, device=triton_device))
    with pytest.raises(ValueError, match=r"block: expected one of \(16, 32, 64\), got 128"):
        block_cholesky_fwd(a, shift, block=128)
    with pytest.raises(ValueError, match=r"a: expected a tensor of shape \(B, n, n\), got \(5, 5\)"):
        block_cholesky_fwd(a[0], shift)
    with pytest.raises(ValueError, match=r"b: expected shape \(2, 5, 3\)|b: expected a tensor of shape \(2, 5, r\)"):
        block_cholesky_solve_fwd(a, torch.zeros(2, 5, device=triton_device))
    with pytest.raises(ValueError, match=r"rhs_block: expected one of \(16, 32, 64\), got 8"):
        block_cholesky_solve_fwd(a, torch.zeros(2, 5, 1, device=triton_device), rhs_block=8)
    if triton_device == "cuda":
        with pytest.raises(ValueError, match=r"a: expected a CUDA tensor"):
            block_cholesky_fwd(a.cpu(), shift.cpu())


def test_default_tiles():
    assert [kernel.default_block(n) for n in (1, 16, 17, 32, 33, 64, 65, 512)] == [16, 16, 32, 32, 64, 64, 64, 64]
    assert all((b, n <= b) in kernel._FACTOR_WARPS for n in (1, 16, 17, 33, 65, 512)
               for b in [kernel.default_block(n)])


# ---- on a GPU: the op's CUDA dispatch at the sizes --------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("n", [32, 64, 100, 128, 257, 512, 600])
def test_cuda_op_fp32(n):
    a = spd(16, n, fp32, "cuda")
    L = block_cholesky(a, 0.01)
    target = damped64(a.cpu(), 0.01)
    assert_cholesky(L, target, fp32)
    assert_close_to_ref(L, block_cholesky_ref(a.double().cpu(), 0.01), torch.linalg.cholesky(target.float()), fp32)
    b = torch.randn(16, n, 3, device="cuda")
    x = block_cholesky_solve(L, b)
    ref = block_cholesky_solve_ref(L.double().cpu(), b.double().cpu())
    assert_close_to_ref(x, ref, torch.cholesky_solve(b.cpu(), L.cpu()), fp32)


@pytest.mark.gpu
def test_cuda_op_fp64_and_errors():
    a = spd(4, 70, fp64, "cuda")
    L = block_cholesky(a, 0.01)
    assert_cholesky(L, damped64(a.cpu(), 0.01), fp64)
    bad = spd(4, 70)
    bad[2] = with_failing_minor(bad[2], 66)
    for dtype in (fp32, fp64):
        with pytest.raises(ValueError, match=r"A\[2\]: block 2 .*order 66"):
            block_cholesky(bad.to(dtype).cuda())


@pytest.mark.gpu
@pytest.mark.parametrize("n, block", [(100, 16), (100, 32), (300, 64)])
def test_cuda_launcher_tiles(n, block):
    a = spd(8, n, fp32, "cuda")
    L, info = block_cholesky_fwd(a, torch.zeros(8, device="cuda"), block=block)
    assert (info == 0).all()
    assert_cholesky(L, damped64(a.cpu(), 0.0), fp32)
    b = torch.randn(8, n, 40, device="cuda")
    for rhs_block in kernel.RHS_BLOCKS:
        x = block_cholesky_solve_fwd(L, b, block=block, rhs_block=rhs_block)
        ref = block_cholesky_solve_ref(L.double().cpu(), b.double().cpu())
        assert_close_to_ref(x, ref, torch.cholesky_solve(b.cpu(), L.cpu()), fp32)
