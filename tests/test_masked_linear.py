"""sparse_engine::masked_linear through the op layer on CPU: values, gradients, opcheck, compile,
errors. The Triton launchers are tested in test_masked_linear_triton.py, the C++ functions in
test_build.py; the GPU paths at the end run on a lent GPU."""
import pytest
import torch

from sparse_engine.ops import masked_linear, masked_linear_ref, pack_mask
from tolerance import assert_matches_ref, assert_within_dot_bound

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SHAPES = [(1, 7, 97), (7, 131, 1), (97, 1, 257), (131, 257, 7), (257, 97, 131)]


def make_case(m, n, k, dtype, sparsity, contiguous, device="cpu", bias=True):
    """Random inputs, never zeros; non-contiguous ones are strided views of larger tensors."""
    if contiguous:
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device)
    else:
        x = torch.randn(m, 2 * k, device=device)[:, ::2]
        w = torch.randn(k, n, device=device).t()
    mask = torch.rand(n, k, device=device) >= sparsity
    b = torch.randn(n, device=device) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(w), mask, cast(b)


def case_id(shape):
    return "M{}-N{}-K{}".format(*shape)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_forward_backward_match_reference(shape, dtype, sparsity, contiguous):
    dt = DTYPES[dtype]
    x, w, mask, b = make_case(*shape, dt, sparsity, contiguous)
    bits = pack_mask(mask)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = masked_linear(x, w, bits, b)
    assert y.dtype == dt and y.shape == (shape[0], shape[1])
    dy = torch.randn_like(y)
    y.backward(dy)

    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = masked_linear_ref(leaves64[0], leaves64[1], bits, leaves64[2])
    ref.backward(dy.double())
    leaves_lp = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    lowp = torch.nn.functional.linear(leaves_lp[0], leaves_lp[1] * mask, leaves_lp[2])
    lowp.backward(dy)

    if dt == torch.float64:
        xa, wma, dya = x.detach().abs(), (w.detach() * mask).abs(), dy.abs()
        assert_within_dot_bound(y, ref, xa @ wma.t() + b.detach().abs(), shape[2] + 1)
        assert_within_dot_bound(x.grad, leaves64[0].grad, dya @ wma, shape[1])
        assert_within_dot_bound(w.grad, leaves64[1].grad, (dya.t() @ xa) * mask, shape[0])
        assert_within_dot_bound(b.grad, leaves64[2].grad, dya.sum(0), shape[0])
    else:
        assert_matches_ref(y, ref, lowp, dt)
        for got, r64, lp in zip((x.grad, w.grad, b.grad), leaves64, leaves_lp):
            assert_matches_ref(got, r64.grad, lp.grad, dt)
    for got in (x.grad, w.grad, b.grad):
        assert got.dtype == dt
    assert (w.grad[~mask] == 0).all(), "pruned entries of dW must be exact zeros"
    if sparsity == 1.0:
        assert torch.equal(y, b.detach().expand_as(y))


def test_leading_dims_and_no_bias():
    x = torch.randn(2, 3, 5, 33, dtype=torch.float64)
    w = torch.randn(9, 33, dtype=torch.float64)
    bits = pack_mask(torch.rand(9, 33) < 0.5)
    y = masked_linear(x, w, bits)
    assert y.shape == (2, 3, 5, 9)
    torch.testing.assert_close(y, masked_linear_ref(x, w, bits), rtol=1e-12, atol=1e-12)


def test_grad_ops_with_strided_dy():
    dy = torch.randn(13, 2 * 11, dtype=torch.float64)[:, ::2]
    x = torch.randn(13, 37, dtype=torch.float64)
    w = torch.randn(11, 37, dtype=torch.float64)
    mask = torch.rand(11, 37) < 0.5
    bits = pack_mask(mask)
    dx = torch.ops.sparse_engine.masked_linear_grad_input(dy, w, bits, "triton")
    dw = torch.ops.sparse_engine.masked_linear_grad_weight(dy, x, bits, "triton")
    torch.testing.assert_close(dx, dy @ (w * mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, (dy.t() @ x) * mask, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_several_blocks_of_w(dtype):
    """W large enough that the CPU kernels expand W*M in several 4 MiB blocks of rows (forward, dW)
    and of columns (dX), the last ones ragged; K not a multiple of 32."""
    m, n, k = 9, 1100, 1001 if dtype == torch.float64 else 2011
    x = torch.randn(m, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    mask = torch.rand(n, k) < 0.5
    bits = pack_mask(mask)
    dy = torch.randn(m, n, dtype=torch.float64)
    x_, w_, b_ = (t.to(dtype).requires_grad_() for t in (x, w, b))
    y = masked_linear(x_, w_, bits, b_)
    y.backward(dy.to(dtype))
    xr, wr, br = (t.to(dtype).double().requires_grad_() for t in (x, w, b))
    ref = masked_linear_ref(xr, wr, bits, br)
    ref.backward(dy.to(dtype).double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for got, want in ((y, ref), (x_.grad, xr.grad), (w_.grad, wr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * k ** 0.5)
    assert (w_.grad[~mask] == 0).all()


def test_gradcheck_fp64():
    x = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 37, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    bits = pack_mask(torch.rand(7, 37) < 0.6)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_linear(x, w, bits, b), (x, w, b))


def test_opcheck():
    x = torch.randn(5, 37, requires_grad=True)
    w = torch.randn(7, 37, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    bits = pack_mask(torch.rand(7, 37) < 0.6)
    dy = torch.randn(5, 7)
    torch.library.opcheck(torch.ops.sparse_engine.masked_linear.default, (x, w, bits, b, "triton"))
    torch.library.opcheck(torch.ops.sparse_engine.masked_linear.default, (x, w, bits, None, "triton"))
    torch.library.opcheck(torch.ops.sparse_engine.masked_linear_grad_input.default, (dy, w.detach(), bits, "triton"))
    torch.library.opcheck(torch.ops.sparse_engine.masked_linear_grad_weight.default, (dy, x.detach(), bits, "triton"))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(4, 6, 37, requires_grad=True)
    w = torch.randn(7, 37, requires_grad=True)
    bits = pack_mask(torch.rand(7, 37) < 0.6)
    fn = torch.compile(lambda x, w: masked_linear(x, w, bits).relu().sum(), fullgraph=True, backend="aot_eager")
    fn(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    masked_linear(x, w, bits).relu().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_bad_input():
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    bits = pack_mask(torch.rand(5, 40) < 0.5)
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(5, 2\)"):
        masked_linear(x, w, bits[:, :1])
    with pytest.raises(TypeError, match="mask_bits: expected dtype torch.int32"):
        masked_linear(x, w, bits.to(torch.int64))
    with pytest.raises(TypeError, match="weight: expected a floating dtype"):
        masked_linear(x, w.to(torch.int32), bits)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        masked_linear(x.double(), w, bits)
    with pytest.raises(ValueError, match="x: expected last dimension 40"):
        masked_linear(torch.randn(3, 41), w, bits)
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        masked_linear(x, w, bits, torch.randn(4))
    with pytest.raises(ValueError, match="backend: expected one of"):
        masked_linear(x, w, bits, backend="cublas")
    with pytest.raises(ValueError, match="mask_bits: expected a tensor on cpu"):
        masked_linear(x, w, bits.to("meta"))


# ---- on a lent GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(8192 // 8, 4096 // 4, 11008 // 8)], ids=case_id)
def test_cuda_matches_reference(shape, dtype, sparsity, contiguous, backend):
    if backend == "cuda":
        from sparse_engine import _C
        if not _C.cuda_built():
            pytest.fail("the CUDA C++ kernels were not built on a machine with a GPU")
    dt = DTYPES[dtype]
    x, w, mask, b = make_case(*shape, dt, sparsity, contiguous, device="cuda")
    bits = pack_mask(mask)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = masked_linear(x, w, bits, b, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = masked_linear_ref(leaves64[0], leaves64[1], bits, leaves64[2])
    ref.backward(dy.double())
    lp = [t.detach().clone().requires_grad_() for t in leaves]
    lowp = torch.nn.functional.linear(lp[0], lp[1] * mask, lp[2])
    lowp.backward(dy)
    assert_matches_ref(y, ref, lowp, dt)
    for got, r64, l in zip(leaves, leaves64, lp):
        assert_matches_ref(got.grad, r64.grad, l.grad, dt)
    assert (w.grad[~mask] == 0).all()
