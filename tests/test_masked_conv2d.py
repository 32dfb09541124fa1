"""sparse_engine::masked_conv2d through the op layer on CPU (values, gradients, opcheck, compile,
errors); the Triton launchers are tested in test_masked_conv2d_triton.py."""
import pytest
import torch
import torch.nn.functional as F

from sparse_engine.ops import masked_conv2d, masked_conv2d_ref, pack_mask
from tolerance import assert_matches_ref, assert_within_dot_bound

# (N, C, H, W, Co, kernel, stride, padding, dilation, groups)
CASES = [
    (1, 1, 5, 7, 1, (1, 1), 1, 0, 1, 1),
    (2, 3, 9, 9, 7, (3, 3), 1, 1, 1, 1),
    (3, 4, 13, 11, 6, (3, 1), 2, 2, 2, 2),
    (2, 7, 8, 5, 5, (5, 5), 1, 2, 1, 1),
]


def case_id(c):
    n, ci, h, w, co, k, s, p, d, g = c
    return f"N{n}-C{ci}-{h}x{w}-Co{co}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-g{g}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_match_reference(case, dtype, sparsity, channels_last):
    n, ci, h, wd, co, k, s, p, d, g = case
    x = torch.randn(n, ci, h, wd)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(co, ci // g, *k)
    mask = torch.rand(w.shape) >= sparsity
    b = torch.randn(co)
    bits = pack_mask(mask)
    x, w, b = (t.to(dtype).requires_grad_() for t in (x, w, b))
    y = masked_conv2d(x, w, bits, b, s, p, d, g)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = masked_conv2d_ref(x64, w64, bits, b64, s, p, d, g)
    ref.backward(dy.double())
    lp = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    lowp = F.conv2d(lp[0], lp[1] * mask, lp[2], s, p, d, g)
    lowp.backward(dy)
    assert y.dtype == dtype
    if dtype == torch.float64:
        xa, wma, dya = x.detach().abs(), (w.detach() * mask).abs(), dy.abs()
        conv = (s, p, d, g)
        assert_within_dot_bound(y, ref, F.conv2d(xa, wma, b.detach().abs(), *conv), wma[0].numel() + 1)
        assert_within_dot_bound(x.grad, x64.grad, torch.nn.grad.conv2d_input(xa.shape, wma, dya, *conv),
                                co // g * k[0] * k[1])
        assert_within_dot_bound(w.grad, w64.grad, torch.nn.grad.conv2d_weight(xa, wma.shape, dya, *conv) * mask,
                                dy[:, 0].numel())
        assert_within_dot_bound(b.grad, b64.grad, dya.sum((0, 2, 3)), dy[:, 0].numel())
    else:
        assert_matches_ref(y, ref, lowp, dtype)
        for got, r, l in zip((x.grad, w.grad, b.grad), (x64, w64, b64), lp):
            assert_matches_ref(got, r.grad, l.grad, dtype)
    for got in (x.grad, w.grad, b.grad):
        assert got.dtype == dtype
    assert (w.grad[~mask] == 0).all()


def test_unbatched_input():
    x = torch.randn(3, 9, 9, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    bits = pack_mask(torch.rand(w.shape) < 0.5)
    y = masked_conv2d(x, w, bits, padding=1)
    assert y.shape == (4, 9, 9)
    torch.testing.assert_close(y, masked_conv2d_ref(x[None], w, bits, padding=1)[0], rtol=1e-12, atol=1e-12)


def test_gradcheck_fp64():
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    bits = pack_mask(torch.rand(w.shape) < 0.6)
    assert torch.autograd.gradcheck(lambda x, w, b: masked_conv2d(x, w, bits, b, 2, 1, 1, 2), (x, w, b))


def test_opcheck():
    x = torch.randn(2, 4, 7, 6, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    bits = pack_mask(torch.rand(w.shape) < 0.6)
    conv = ([2, 1], [1, 0], [1, 2], 2)
    torch.library.opcheck(torch.ops.sparse_engine.masked_conv2d.default, (x, w, bits, b, *conv))
    dy = torch.ops.sparse_engine.masked_conv2d(x, w, bits, b, *conv).detach().clone().normal_()
    torch.library.opcheck(torch.ops.sparse_engine.masked_conv2d_grad_input.default,
                          (dy, w.detach(), bits, list(x.shape), *conv))
    torch.library.opcheck(torch.ops.sparse_engine.masked_conv2d_grad_weight.default,
                          (dy, x.detach(), bits, list(w.shape), *conv))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    bits = pack_mask(torch.rand(w.shape) < 0.6)
    fn = torch.compile(lambda x, w: masked_conv2d(x, w, bits, None, 1, 1).square().sum(), fullgraph=True,
                       backend="aot_eager")
    fn(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    masked_conv2d(x, w, bits, None, 1, 1).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_bad_input():
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    bits = pack_mask(torch.rand(w.shape) < 0.5)
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(6, 2\)"):
        masked_conv2d(x, w, bits[:, :1])
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 4, H, W\)"):
        masked_conv2d(torch.randn(2, 3, 8, 8), w, bits)
    with pytest.raises(ValueError, match="groups: expected a positive int"):
        masked_conv2d(x, w, bits, groups=4)
    with pytest.raises(ValueError, match="stride: expected an int or a pair"):
        masked_conv2d(x, w, bits, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        masked_conv2d(torch.randn(1, 4, 2, 2), w, bits)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        masked_conv2d(x.double(), w, bits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_reference(case, dtype):
    n, ci, h, wd, co, k, s, p, d, g = case
    x = torch.randn(n, ci, h, wd, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(co, ci // g, *k, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(co, device="cuda", dtype=dtype, requires_grad=True)
    mask = torch.rand(w.shape, device="cuda") < 0.5
    bits = pack_mask(mask)
    y = masked_conv2d(x, w, bits, b, s, p, d, g)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = masked_conv2d_ref(x64, w64, bits, b64, s, p, d, g)
    ref.backward(dy.double())
    lp = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    lowp = F.conv2d(lp[0], lp[1] * mask, lp[2], s, p, d, g)
    lowp.backward(dy)
    assert_matches_ref(y, ref, lowp, dtype)
    for got, r, l in zip((x.grad, w.grad, b.grad), (x64, w64, b64), lp):
        assert_matches_ref(got, r.grad, l.grad, dtype)
    assert (w.grad[~mask] == 0).all()
