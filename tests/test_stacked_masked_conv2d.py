"""sparse_engine::stacked_masked_conv2d (one grouped convolution for S models) against the per-model
loop reference: values, gradients, fp64 gradcheck, opcheck, compile, errors."""
import pytest
import torch

from sparse_engine.ops.stacked_mask import pack_stacked_mask
from sparse_engine.ops.stacked_masked_conv2d import stacked_masked_conv2d, stacked_masked_conv2d_ref
from tolerance import assert_matches_ref

# (S, B, C, Co, H, W, kernel, stride, padding, dilation, groups)
CASES = [(1, 2, 3, 5, 7, 9, (3, 3), 1, 1, 1, 1), (3, 1, 4, 6, 11, 5, (3, 1), (2, 1), (0, 1), 1, 2),
         (4, 3, 1, 7, 8, 8, (2, 2), 2, 0, (1, 2), 1), (2, 2, 6, 6, 5, 7, (3, 3), 1, 2, 2, 6)]


def case_id(c):
    return "S{}-B{}-C{}-Co{}-H{}-W{}-g{}".format(*c[:6], c[-1])


def make_case(c, dtype=torch.float64):
    s, b, ci, co, h, w, ks, stride, padding, dilation, groups = c
    x = torch.randn(s, b, ci, h, w, dtype=dtype)
    wt = torch.randn(s, co, ci // groups, *ks, dtype=dtype)
    mask = torch.rand(wt.shape) >= torch.rand(s, 1, 1, 1, 1)
    bias = torch.randn(s, co, dtype=dtype)
    return x, wt, mask, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def check_against_reference(x, w, mask, b, conv):
    """Forward and all gradients against the float64 loop reference (fp64: to 1e-12; else the tolerance rule)."""
    bits = pack_stacked_mask(mask)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    y = stacked_masked_conv2d(x, w, bits, b, **conv)
    dy = torch.randn_like(y)
    y.backward(dy)
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = stacked_masked_conv2d_ref(*l64[:2], bits, l64[2], **conv)
    ref.backward(dy.double())
    lp = [t.detach().clone().requires_grad_() for t in leaves]
    lowp = torch.stack([torch.nn.functional.conv2d(lp[0][i], lp[1][i] * mask[i], lp[2][i], **conv)
                        for i in range(x.shape[0])])
    lowp.backward(dy)
    if x.dtype == torch.float64:
        for got, r in zip((y, *(t.grad for t in leaves)), (ref, *(t.grad for t in l64))):
            torch.testing.assert_close(got, r, rtol=1e-12, atol=1e-12)
    else:
        assert_matches_ref(y, ref, lowp, x.dtype)
        for got, r, base in zip(leaves, l64, lp):
            assert_matches_ref(got.grad, r.grad, base.grad, x.dtype)
    assert (w.grad[~mask] == 0).all(), "pruned entries of dW must be exact zeros"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_match_reference(case, dtype):
    x, w, mask, b, conv = make_case(case, dtype)
    check_against_reference(x, w, mask, b, conv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_materialized_implementation_matches_reference(case, dtype):
    """The other implementation dispatch may pick (on CPU the vendor conv once per model on its masked weight,
    through masked_weight_for_op): same values, exact-zero pruned dW."""
    from sparse_engine.ops import dispatch
    before = dispatch.pinned()
    dispatch.pin("materialized")
    try:
        check_against_reference(*make_case(case, dtype))
    finally:
        dispatch.pin(before)


def test_gradcheck_fp64():
    x, w, mask, b, conv = make_case(CASES[1])
    bits = pack_stacked_mask(mask)
    args = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: stacked_masked_conv2d(x, w, bits, b, **conv), args)


def test_opcheck():
    x, w, mask, b, conv = make_case(CASES[1], torch.float32)
    bits = pack_stacked_mask(mask)
    conv = [[2, 1], [0, 1], [1, 1], 2]
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    op = torch.ops.sparse_engine
    y = op.stacked_masked_conv2d(x, w, bits, b, *conv)
    dy = torch.randn_like(y)
    torch.library.opcheck(op.stacked_masked_conv2d.default, (x, w, bits, b, *conv))
    torch.library.opcheck(op.stacked_masked_conv2d.default, (x, w, bits, None, *conv))
    torch.library.opcheck(op.stacked_masked_conv2d_grad_input.default, (dy, w.detach(), bits, list(x.shape), *conv))
    torch.library.opcheck(op.stacked_masked_conv2d_grad_weight.default, (dy, x.detach(), bits, list(w.shape), *conv))


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, w, mask, b, conv = make_case(CASES[0], torch.float32)
    bits = pack_stacked_mask(mask)
    w.requires_grad_()
    fn = torch.compile(lambda x, w: stacked_masked_conv2d(x, w, bits, b, **conv).relu().sum(), fullgraph=True,
                       backend="aot_eager")
    fn(x, w).backward()
    gw = w.grad.clone()
    w.grad = None
    stacked_masked_conv2d(x, w, bits, b, **conv).relu().sum().backward()
    torch.testing.assert_close(gw, w.grad)


def test_bad_input():
    x, w, mask, b, conv = make_case(CASES[0], torch.float32)
    bits = pack_stacked_mask(mask)
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(1, 5, 1\)"):
        stacked_masked_conv2d(x, w, bits[:, :2])
    with pytest.raises(ValueError, match=r"x: expected shape \(1, B, 3, H, W\)"):
        stacked_masked_conv2d(x[0], w, bits)
    with pytest.raises(ValueError, match="groups: expected a positive int"):
        stacked_masked_conv2d(x, w, bits, groups=2)
    with pytest.raises(ValueError, match=r"bias: expected shape \(1, 5\)"):
        stacked_masked_conv2d(x, w, bits, b[0])
    with pytest.raises(ValueError, match="smaller than the kernel's span"):
        stacked_masked_conv2d(x[..., :2, :], w, bits)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_matches_reference(case, monkeypatch):
    """The op's CUDA kernels (the Triton stacked launchers; conftest pins the fused implementation)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 products, as the reference
    x, w, mask, b, conv = (t.cuda().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                           for t in make_case(case))
    check_against_reference(x, w, mask.cuda(), b, conv)
