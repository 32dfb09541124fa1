"""sparse_engine::stacked_masked_linear: values and gradients against the per-model loop reference,
fp64 gradcheck, opcheck, compile, errors, and the Triton launchers under the interpreter."""
import pytest
import torch

from sparse_engine.kernels.stacked_masked_linear import (stacked_masked_linear_bwd_input,
                                                         stacked_masked_linear_bwd_weight, stacked_masked_linear_fwd)
from sparse_engine.ops import pack_mask
from sparse_engine.ops.stacked_mask import (apply_stacked_mask, pack_stacked_mask, unpack_stacked_mask,
                                           unpack_stacked_mask_ref)
from sparse_engine.ops.stacked_masked_linear import stacked_masked_linear, stacked_masked_linear_ref
from tolerance import assert_matches_ref, assert_within_dot_bound

SHAPES = [(1, 1, 7, 97), (3, 7, 131, 1), (5, 97, 1, 33), (2, 13, 65, 7)]  # (S, M, N, K)


def case_id(shape):
    return "S{}-M{}-N{}-K{}".format(*shape)


def make_case(s, m, n, k, dtype=torch.float64, device="cpu"):
    x = torch.randn(s, m, k).to(dtype).to(device)
    w = torch.randn(s, n, k).to(dtype).to(device)
    mask = torch.rand(s, n, k) >= torch.rand(s, 1, 1)  # a different sparsity per model
    b = torch.randn(s, n).to(dtype).to(device)
    return x, w, mask.to(device), b


def test_stacked_mask_layout_is_each_models_pack_mask():
    mask = torch.rand(4, 7, 3, 5, 5) < 0.5
    bits = pack_stacked_mask(mask)
    assert bits.shape == (4, 7, 3)
    for i in range(4):
        assert torch.equal(bits[i], pack_mask(mask[i]))
    assert torch.equal(unpack_stacked_mask(bits, mask.shape), mask)
    assert torch.equal(unpack_stacked_mask_ref(bits, mask.shape), mask)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=["fp16", "fp32", "fp64"])
def test_apply_stacked_mask_gives_exact_zeros_even_for_nan_and_inf(dtype):
    t = torch.randn(3, 5, 37).to(dtype)
    t[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    mask = torch.rand(3, 5, 37) < 0.5
    mask[0, 0, :3] = False
    out = apply_stacked_mask(t, pack_stacked_mask(mask))
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(out[mask], t[mask])
    assert (out[~mask] == 0).all() and not torch.signbit(out[~mask]).any()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=case_id)
def test_forward_backward_fp64_match_reference(shape, bias):
    s, m, n, k = shape
    x, w, mask, b = make_case(*shape)
    b = b if bias else None
    bits = pack_stacked_mask(mask)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = stacked_masked_linear(x, w, bits, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    leaves64 = [t.detach().clone().requires_grad_() for t in leaves]
    ref = stacked_masked_linear_ref(leaves64[0], leaves64[1], bits, leaves64[2] if bias else None)
    ref.backward(dy)
    xa, wma, dya = x.detach().abs(), (w.detach() * mask).abs(), dy.abs()
    assert_within_dot_bound(y, ref, xa @ wma.transpose(1, 2) + (b.detach().abs()[:, None] if bias else 0), k + 1)
    assert_within_dot_bound(x.grad, leaves64[0].grad, dya @ wma, n)
    assert_within_dot_bound(w.grad, leaves64[1].grad, (dya.transpose(1, 2) @ xa) * mask, m)
    if bias:
        assert_within_dot_bound(b.grad, leaves64[2].grad, dya.sum(1), m)
    assert (w.grad[~mask] == 0).all(), "pruned entries of dW must be exact zeros"


def test_fp32_and_broadcast_input_and_leading_dims():
    s, n, k = 3, 11, 40
    x1 = torch.randn(2, 5, k)
    w = torch.randn(s, n, k)
    mask = torch.rand(s, n, k) < 0.5
    bits = pack_stacked_mask(mask)
    y = stacked_masked_linear(x1.expand(s, 2, 5, k), w, bits)  # one batch broadcast to every model
    assert y.shape == (s, 2, 5, n)
    ref = stacked_masked_linear_ref(x1.double().expand(s, 2, 5, k), w.double(), bits)
    lowp = torch.stack([x1 @ (w[i] * mask[i]).t() for i in range(s)])
    assert_matches_ref(y, ref, lowp, torch.float32)


def test_gradcheck_fp64():
    x, w, mask, b = make_case(3, 4, 5, 37)
    bits = pack_stacked_mask(mask)
    args = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: stacked_masked_linear(x, w, bits, b), args)


def test_opcheck():
    x, w, mask, b = (t.float() if t.is_floating_point() else t for t in make_case(3, 5, 7, 37))
    bits = pack_stacked_mask(mask)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    dy = torch.randn(3, 5, 7)
    op = torch.ops.sparse_engine
    torch.library.opcheck(op.stacked_masked_linear.default, (x, w, bits, b))
    torch.library.opcheck(op.stacked_masked_linear.default, (x, w, bits, None))
    torch.library.opcheck(op.stacked_masked_linear_grad_input.default, (dy, w.detach(), bits))
    torch.library.opcheck(op.stacked_masked_linear_grad_weight.default, (dy, x.detach(), bits))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, mask, b = (t.float() if t.is_floating_point() else t for t in make_case(3, 6, 7, 37))
    bits = pack_stacked_mask(mask)
    x.requires_grad_(), w.requires_grad_()
    fn = torch.compile(lambda x, w: stacked_masked_linear(x, w, bits, b).relu().sum(), fullgraph=True,
                       backend="aot_eager")
    fn(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    stacked_masked_linear(x, w, bits, b).relu().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_bad_input():
    x, w = torch.randn(2, 3, 40), torch.randn(2, 5, 40)
    bits = pack_stacked_mask(torch.rand(2, 5, 40) < 0.5)
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(2, 5, 2\)"):
        stacked_masked_linear(x, w, bits[:, :, :1])
    with pytest.raises(TypeError, match="mask_bits: expected dtype torch.int32"):
        stacked_masked_linear(x, w, bits.long())
    with pytest.raises(ValueError, match="weight: expected a stacked weight of rank 3"):
        stacked_masked_linear(x, w[0], bits)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, \.\.\., 40\)"):
        stacked_masked_linear(torch.randn(3, 3, 40), w, bits)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        stacked_masked_linear(x.double(), w, bits)
    with pytest.raises(ValueError, match=r"bias: expected shape \(2, 5\)"):
        stacked_masked_linear(x, w, bits, torch.randn(5))


# ---- Triton launchers (the interpreter on CPU, or a GPU) -------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(3, 5, 7, 37), (2, 1, 33, 65)], ids=case_id)
def test_triton_launchers_match_reference(shape, dtype, triton_device):
    s, m, n, k = shape
    x, w, mask, b = make_case(*shape, dtype=dtype, device=triton_device)
    x = torch.randn(s, k, 2 * m).to(dtype).to(triton_device).transpose(1, 2)[:, ::2]  # strided input
    bits = pack_stacked_mask(mask)
    dy = torch.randn(s, m, n).to(dtype).to(triton_device)
    y = stacked_masked_linear_fwd(x, w, bits, b)
    dx = stacked_masked_linear_bwd_input(dy, w, bits)
    dw = stacked_masked_linear_bwd_weight(dy, x, bits)
    x64, w64, b64, dy64, mask64 = x.double(), w.double(), b.double(), dy.double(), mask.double()
    wm64 = w64 * mask64
    ref_y, ref_dx = x64 @ wm64.transpose(1, 2) + b64[:, None], dy64 @ wm64
    ref_dw = (dy64.transpose(1, 2) @ x64) * mask64
    # baseline: the same products in `dtype` with fp32 accumulation and one final rounding
    f = lambda t: t.float()
    wm = f(w) * mask
    base_y = (f(x) @ wm.transpose(1, 2) + f(b)[:, None]).to(dtype)
    base_dx = (f(dy) @ wm).to(dtype)
    base_dw = ((f(dy).transpose(1, 2) @ f(x)) * mask).to(dtype)
    for got, ref, base in ((y, ref_y, base_y), (dx, ref_dx, base_dx), (dw, ref_dw, base_dw)):
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * max(k, m, n))
        else:
            assert_matches_ref(got.cpu(), ref.cpu(), base.cpu(), dtype)
    assert (dw[~mask] == 0).all()


def test_triton_launcher_rejects_bad_mask(triton_device):
    x, w, mask, b = make_case(2, 3, 5, 40, dtype=torch.float32, device=triton_device)
    bits = pack_stacked_mask(mask)
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(2, 5, 2\)"):
        stacked_masked_linear_fwd(x, w, bits[:, :, :1])


# ---- on a lent GPU ---------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES + [(16, 128, 300, 784)], ids=case_id)
def test_cuda_op_matches_reference(shape, dtype):
    x, w, mask, b = make_case(*shape, dtype=dtype, device="cuda")
    bits = pack_stacked_mask(mask)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = stacked_masked_linear(x, w, bits, b)
    dy = torch.randn_like(y)
    y.backward(dy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = stacked_masked_linear_ref(l64[0], l64[1], bits, l64[2])
    ref.backward(dy.double())
    lp = [t.detach().clone().requires_grad_() for t in leaves]
    lowp = torch.stack([torch.nn.functional.linear(lp[0][i], lp[1][i] * mask[i], lp[2][i]) for i in range(shape[0])])
    lowp.backward(dy)
    assert_matches_ref(y, ref, lowp, dtype)
    for got, r64, base in zip(leaves, l64, lp):
        assert_matches_ref(got.grad, r64.grad, base.grad, dtype)
    assert (w.grad[~mask] == 0).all()
