"""Triton masked conv2d launchers (forward, input gradient, weight gradient) against float64 torch.

On a CPU-only machine they run under TRITON_INTERPRET=1 (set by conftest.py), so shapes are tiny.
The launchers are called directly: through the op, dispatch would pick the CPU kernel.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from sparse_engine.kernels.masked_conv2d import (masked_conv2d_bwd_input, masked_conv2d_bwd_weight,
                                                 masked_conv2d_fwd)


def pack_bits(keep):
    """Keep-mask of any rank >= 2 -> int32 (rows, ceil(cols/32)), bit j of word w = element 32*w + j."""
    flat = keep.reshape(keep.shape[0], -1).to(torch.int64)
    cols = flat.shape[1]
    words = math.ceil(cols / 32)
    flat = F.pad(flat, (0, 32 * words - cols)).view(keep.shape[0], words, 32)
    packed = (flat << torch.arange(32, device=keep.device)).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # bit 31 is the int32 sign bit
    return packed.to(torch.int32).contiguous()


class Conv:
    """One conv problem; `id` reads like N2-C3-9x7-k3x3-s1x1-p1x1-d1x1-g1."""

    def __init__(self, nb, c, h, w, co, kh, kw, stride, padding, dilation, groups):
        self.nb, self.c, self.h, self.w, self.co, self.kh, self.kw = nb, c, h, w, co, kh, kw
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    @property
    def conv_args(self):
        return self.stride, self.padding, self.dilation, self.groups

    @property
    def id(self):
        xy = lambda p: f"{p[0]}x{p[1]}"
        return (f"N{self.nb}-C{self.c}-{self.h}x{self.w}-k{self.kh}x{self.kw}-s{xy(self.stride)}"
                f"-p{xy(self.padding)}-d{xy(self.dilation)}-g{self.groups}-Co{self.co}")


CONVS = [
    Conv(2, 3, 9, 7, 4, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    Conv(1, 1, 9, 9, 5, 3, 3, (1, 1), (0, 0), (2, 2), 1),
    Conv(2, 7, 5, 9, 3, 1, 1, (2, 2), (0, 0), (1, 1), 1),
    Conv(1, 4, 13, 5, 6, 3, 1, (2, 1), (2, 0), (2, 1), 2),
    Conv(3, 2, 5, 5, 4, 5, 5, (2, 2), (2, 2), (1, 1), 2),
    Conv(2, 6, 9, 13, 34, 3, 3, (2, 2), (1, 1), (1, 1), 2),  # Co/g = 17 > one 16-wide tile
]
# Under the interpreter's small fixed tiles (32/16/32, bwd_weight 16/32/32) the first problem spans
# several M tiles and the last several N tiles (forward) and M tiles (bwd_weight).


def make_inputs(conv, dtype, device, sparsity, layout="contiguous"):
    cg = conv.c // conv.groups
    x = torch.randn(conv.nb, conv.c, conv.h, conv.w, device=device)
    w = torch.randn(conv.co, cg, conv.kh, conv.kw, device=device) / math.sqrt(cg * conv.kh * conv.kw)
    b = torch.randn(conv.co, device=device)
    keep = torch.rand(w.shape, device=device) >= sparsity
    y_shape = F.conv2d(x, w, None, *conv.conv_args).shape
    dy = torch.randn(y_shape, device=device)
    x, w, b, dy = (t.to(dtype) for t in (x, w, b, dy))
    if layout == "channels_last":
        x, w, dy = (t.to(memory_format=torch.channels_last) for t in (x, w, dy))
    elif layout == "strided":
        x, dy = spread(x), spread(dy)
        w = w.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)  # stored (KH, KW, Co, Ci)
    return x, w, b, keep, dy


def spread(t):
    """Same values, no dense layout: batch and channel swapped in memory, every other column used."""
    nb, c, h, w = t.shape
    view = torch.full((c, nb, h, 2 * w), float("nan"), dtype=t.dtype, device=t.device).transpose(0, 1)[..., ::2]
    return view.copy_(t)


def reference(conv, x, w, b, keep, dy, dtype=torch.float64):
    """conv2d with weight W*M and its two gradients (dw masked), computed in `dtype`."""
    x, w, b, dy = (t.to(dtype) for t in (x, w, b, dy))
    y = F.conv2d(x, w * keep, b, *conv.conv_args)
    dx = torch.nn.grad.conv2d_input(x.shape, w * keep, dy, *conv.conv_args)
    dw = torch.nn.grad.conv2d_weight(x, w.shape, dy, *conv.conv_args) * keep
    return y, dx, dw


def run_kernels(conv, x, w, b, keep, dy, monkeypatch, **kw):
    """The three launchers, with every buffer they allocate poisoned so an unwritten element shows."""
    empty = torch.empty
    bits = pack_bits(keep)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        y = masked_conv2d_fwd(x, w, bits, b, *conv.conv_args, **kw)
        dx = masked_conv2d_bwd_input(dy, w, bits, x.shape, *conv.conv_args, **kw)
        dw = masked_conv2d_bwd_weight(dy, x, bits, w.shape, *conv.conv_args, **kw)
    return y, dx, dw


def check_all(conv, x, w, b, keep, dy, monkeypatch, rel=1e-5, **kw):
    """y, dx, dw against float64.

    fp32: max error <= rel * max|reference|. fp16/bf16: max error at most 2x that of torch's own
    low-precision conv, modelled as torch computing in fp32 from the same rounded inputs and rounding
    its output to the input dtype (what cuDNN does with fp16 inputs and fp32 accumulation; taken on
    the CPU, where fp32 convolutions never use TF32). Both errors are then dominated by the output
    rounding, so a wrong tap or a lost term (error ~ one input product) fails; the floor
    1e-5 * scale only matters where torch is exact (all-pruned rows).
    """
    got = run_kernels(conv, x, w, b, keep, dy, monkeypatch, **kw)
    want = reference(conv, x, w, b, keep, dy)
    if x.dtype != torch.float32:
        torch_fp32 = reference(conv, *(t.cpu() for t in (x, w, b, keep, dy)), dtype=torch.float32)
    for i, (name, g, r) in enumerate(zip(("y", "dx", "dw"), got, want)):
        assert g.dtype == x.dtype and g.shape == r.shape, name
        err = (g.double() - r).abs().max().item()
        scale = r.abs().max().item() + 1e-30
        if x.dtype == torch.float32:
            assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} * {scale:.3g}"
        else:
            torch_err = (torch_fp32[i].to(x.dtype).to(r) - r).abs().max().item()
            assert err <= 2 * torch_err + 1e-5 * scale, f"{name}: max error {err:.3g} > 2 x torch's {torch_err:.3g}"
    dw = got[2]
    assert dw.is_contiguous()
    assert (dw[~keep] == 0).all(), "pruned dw entries must be exact zeros"
    return got


# fp32 with IEEE products: ~1e-7 relative per term, far below 1e-5 of the output scale for K <= 75.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("conv", CONVS, ids=[c.id for c in CONVS])
def test_matches_float64(conv, dtype, triton_device, monkeypatch):
    check_all(conv, *make_inputs(conv, dtype, triton_device, 0.5), monkeypatch)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_sparsity(sparsity, triton_device, monkeypatch):
    conv = CONVS[0]
    inputs = make_inputs(conv, torch.float32, triton_device, sparsity)
    y, dx, dw = check_all(conv, *inputs, monkeypatch)
    if sparsity == 1.0:
        assert (dw == 0).all() and (dx == 0).all()
        assert (y == inputs[2].view(1, -1, 1, 1)).all(), "all-pruned output must be the bias"


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[3]], ids=[CONVS[0].id, CONVS[3].id])
def test_layouts(conv, layout, triton_device, monkeypatch):
    x, w, b, keep, dy = make_inputs(conv, torch.float16, triton_device, 0.5, layout)
    y, dx, _ = check_all(conv, x, w, b, keep, dy, monkeypatch)
    # Outputs follow the input's memory format, as torch's conv2d does.
    cl = layout == "channels_last"
    assert y.is_contiguous(memory_format=torch.channels_last) == cl and y.is_contiguous() != cl
    assert dx.is_contiguous(memory_format=torch.channels_last) == cl and dx.is_contiguous() != cl


def test_no_bias_and_split_reduction(triton_device):
    """bias=None; the weight gradient's reduction cut into splits gives the unsplit result."""
    conv = Conv(3, 4, 13, 13, 8, 3, 3, (1, 1), (1, 1), (1, 1), 2)  # Nb*OH*OW = 507: four 128-row splits
    x, w, b, keep, dy = make_inputs(conv, torch.float32, triton_device, 0.5)
    bits = pack_bits(keep)
    y = masked_conv2d_fwd(x, w, bits, None, *conv.conv_args)
    want = F.conv2d(x.double(), w.double() * keep, None, *conv.conv_args)
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()
    whole = masked_conv2d_bwd_weight(dy, x, bits, w.shape, *conv.conv_args, split_k=1)
    for split_k in (2, 4, 100):
        split = masked_conv2d_bwd_weight(dy, x, bits, w.shape, *conv.conv_args, split_k=split_k)
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
        assert (split[~keep] == 0).all()


def test_allow_tf32(triton_device, monkeypatch):
    # TF32 keeps 10 mantissa bits (relative rounding 2**-11) on each product's inputs.
    conv = CONVS[4]
    check_all(conv, *make_inputs(conv, torch.float32, triton_device, 0.5), monkeypatch, rel=5e-3, allow_tf32=True)


def test_empty_batch(triton_device):
    conv = CONVS[0]
    x, w, b, keep, dy = make_inputs(conv, torch.float32, triton_device, 0.5)
    bits = pack_bits(keep)
    assert masked_conv2d_fwd(x[:0], w, bits, b, *conv.conv_args).shape == (0,) + dy.shape[1:]
    assert masked_conv2d_bwd_input(dy[:0], w, bits, x[:0].shape, *conv.conv_args).shape == x[:0].shape
    assert (masked_conv2d_bwd_weight(dy[:0], x[:0], bits, w.shape, *conv.conv_args) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[4], CONVS[5]], ids=[CONVS[i].id for i in (0, 4, 5)])
def test_bf16(conv, monkeypatch):
    check_all(conv, *make_inputs(conv, torch.bfloat16, "cuda", 0.5), monkeypatch)
    check_all(conv, *make_inputs(conv, torch.bfloat16, "cuda", 0.5, "channels_last"), monkeypatch)


@pytest.mark.gpu
def test_gpu_sized(monkeypatch):
    """A ResNet-like layer: several autotuned tiles per axis and the default reduction split."""
    conv = Conv(8, 64, 28, 28, 128, 3, 3, (2, 2), (1, 1), (1, 1), 1)
    check_all(conv, *make_inputs(conv, torch.float16, "cuda", 0.9, "channels_last"), monkeypatch)


def _bad_calls(device):
    x = torch.randn(2, 4, 7, 7, device=device)
    w = torch.randn(6, 2, 3, 3, device=device)
    bits = pack_bits(torch.ones(w.shape, dtype=torch.bool, device=device))
    b = torch.randn(6, device=device)
    dy = torch.randn(2, 6, 7, 7, device=device)
    args = ((1, 1), (1, 1), (1, 1), 2)

    def fwd(x=x, weight=w, mask_bits=bits, bias=b):
        return masked_conv2d_fwd(x, weight, mask_bits, bias, *args)

    return {
        "x-3d": (lambda: fwd(x=x[0]), "x must be 4-D"),
        "x-int": (lambda: fwd(x=x.long()), "x must be float32, float16 or bfloat16"),
        "weight-dtype": (lambda: fwd(weight=w.half()), "weight must have dtype torch.float32"),
        "bits-dtype": (lambda: fwd(mask_bits=bits.long()), "mask_bits must have dtype torch.int32"),
        "bits-shape": (lambda: fwd(mask_bits=bits[:, :0]), r"mask_bits must have shape \(6, 1\)"),
        "bits-strided": (lambda: fwd(mask_bits=torch.cat([bits, bits], 1)[:, ::2]), "mask_bits must be contiguous"),
        "channels": (lambda: fwd(weight=w[:, :1]), r"x has 4 channels, expected weight.shape\[1\] \* groups"),
        "bias-shape": (lambda: fwd(bias=b[:5]), r"bias must have shape \(6,\)"),
        "stride-int": (lambda: masked_conv2d_fwd(x, w, bits, b, 1, (1, 1), (1, 1), 2), "stride must be a pair"),
        "padding-neg": (lambda: masked_conv2d_fwd(x, w, bits, b, (1, 1), (-1, 0), (1, 1), 2), "padding must be >= 0"),
        "groups": (lambda: masked_conv2d_fwd(x, w, bits, b, (1, 1), (1, 1), (1, 1), 4),
                   "divisible by groups=4"),
        "empty-out": (lambda: masked_conv2d_fwd(x, w, bits, b, (1, 1), (0, 0), (4, 4), 2), "output would be empty"),
        "dy-shape": (lambda: masked_conv2d_bwd_input(dy[:1], w, bits, x.shape, *args), r"dy must have shape \(2, 6"),
        "x_shape": (lambda: masked_conv2d_bwd_input(dy, w, bits, (2, 4, 7), *args), "x_shape must be 4"),
        "dy-dtype": (lambda: masked_conv2d_bwd_weight(dy.half(), x, bits, w.shape, *args), "dy must have dtype"),
        "split_k": (lambda: masked_conv2d_bwd_weight(dy, x, bits, w.shape, *args, split_k=0), "split_k must be"),
        "weight_shape": (lambda: masked_conv2d_bwd_weight(dy, x, bits, (6, 2, 3), *args), "weight_shape must be 4"),
    }


@pytest.mark.parametrize("case", list(_bad_calls("cpu")))
def test_bad_inputs(case, triton_device):
    call, match = _bad_calls(triton_device)[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        masked_conv2d_fwd(x, w, pack_bits(w > 0), None, (1, 1), (1, 1), (1, 1), 1)


def test_strided_bias(triton_device):
    """A bias that is a strided view (every other element of a buffer) is read at its stride."""
    conv = CONVS[5]
    x, w, b, keep, dy = make_inputs(conv, torch.float32, triton_device, 0.5)
    strided = torch.full((2 * conv.co,), float("nan"), device=triton_device)[::2].copy_(b)
    y = masked_conv2d_fwd(x, w, pack_bits(keep), strided, *conv.conv_args)
    want = F.conv2d(x.double(), w.double() * keep, b.double(), *conv.conv_args)
    assert (y.double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_groups_beyond_grid_axis(triton_device):
    """groups run along the grid's z axis, which holds 65535 programs: more is refused by name."""
    groups = 65536
    x = torch.randn(1, groups, 1, 1, device=triton_device)
    w = torch.randn(groups, 1, 1, 1, device=triton_device)
    bits = pack_bits(torch.ones(w.shape, dtype=torch.bool, device=triton_device))
    dy = torch.randn(1, groups, 1, 1, device=triton_device)
    args = ((1, 1), (0, 0), (1, 1), groups)
    with pytest.raises(ValueError, match="groups: expected at most 65535"):
        masked_conv2d_fwd(x, w, bits, None, *args)
    with pytest.raises(ValueError, match="groups: expected at most 65535"):
        masked_conv2d_bwd_input(dy, w, bits, x.shape, *args)
    with pytest.raises(ValueError, match="groups: expected at most 65535"):
        masked_conv2d_bwd_weight(dy, x, bits, w.shape, *args)


def test_autotune_keys_are_bucketed():
    """Batch size and resolution enter the autotune key only as a power-of-two bucket of the GEMM's
    M, so a new batch size or image size within a bucket reuses the tuned config."""
    from sparse_engine.kernels import masked_conv2d as mc
    for kernel in (mc._masked_conv2d_fwd_kernel, mc._masked_conv2d_bwd_input_kernel,
                   mc._masked_conv2d_bwd_weight_kernel):
        assert "M_BUCKET" in kernel.keys
        assert not {"Nb", "H", "W", "OH", "OW"} & set(kernel.keys), kernel.keys
