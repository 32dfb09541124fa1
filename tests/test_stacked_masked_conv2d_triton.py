"""Triton stacked masked conv2d launchers: S models' convolutions in one launch, against float64 torch.

Each model is checked as test_masked_conv2d_triton.py checks the single-model launchers (same
problems, tolerances and poisoned buffers); under TRITON_INTERPRET=1 on a CPU-only machine.
"""
import pytest
import torch

from sparse_engine.kernels.masked_conv2d import (stacked_masked_conv2d_bwd_input, stacked_masked_conv2d_bwd_weight,
                                                 stacked_masked_conv2d_fwd)
from test_masked_conv2d_triton import CONVS, make_inputs, pack_bits, reference

S = 3


def stacked_inputs(conv, dtype, device, model_major):
    """S models' inputs with different values and masks (sparsity 0.2, 0.5, 0.9), stacked. With
    ``model_major=False`` x and dy keep the batch outermost in memory: the model stride is not the
    largest, and no model is one dense block."""
    per_model = [make_inputs(conv, dtype, device, sparsity) for sparsity in (0.2, 0.5, 0.9)]
    stacked = [torch.stack([m[i] for m in per_model]) for i in range(5)]
    if not model_major:
        stacked[0] = torch.stack([m[0] for m in per_model], 1).transpose(0, 1)  # x
        stacked[4] = torch.stack([m[4] for m in per_model], 1).transpose(0, 1)  # dy
    return per_model, stacked


def run_stacked(conv, x, w, b, keep, dy, monkeypatch):
    empty = torch.empty
    bits = torch.stack([pack_bits(k) for k in keep])
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(float("nan")))
        y = stacked_masked_conv2d_fwd(x, w, bits, b, *conv.conv_args)
        dx = stacked_masked_conv2d_bwd_input(dy, w, bits, x.shape, *conv.conv_args)
        dw = stacked_masked_conv2d_bwd_weight(dy, x, bits, w.shape, *conv.conv_args)
    return y, dx, dw


@pytest.mark.parametrize("model_major", [True, False], ids=["models-outer", "batch-outer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("conv", [CONVS[0], CONVS[3], CONVS[5]], ids=[c.id for c in (CONVS[0], CONVS[3], CONVS[5])])
def test_each_model_matches_float64(conv, dtype, model_major, triton_device, monkeypatch):
    per_model, stacked = stacked_inputs(conv, dtype, triton_device, model_major)
    got = run_stacked(conv, *stacked, monkeypatch)
    for s, inputs in enumerate(per_model):
        want = reference(conv, *inputs)
        if dtype != torch.float32:
            torch_fp32 = reference(conv, *(t.cpu() for t in inputs), dtype=torch.float32)
        for i, name in enumerate(("y", "dx", "dw")):
            g, r = got[i][s], want[i]
            assert g.dtype == dtype and g.shape == r.shape, name
            err = (g.double() - r).abs().max().item()
            scale = r.abs().max().item() + 1e-30
            if dtype == torch.float32:
                assert err <= 1e-5 * scale, f"model {s} {name}: max error {err:.3g}"
            else:
                torch_err = (torch_fp32[i].to(dtype).to(r) - r).abs().max().item()
                assert err <= 2 * torch_err + 1e-5 * scale, f"model {s} {name}: {err:.3g} > 2 x {torch_err:.3g}"
        assert (got[2][s][~inputs[3]] == 0).all(), "pruned dw entries must be exact zeros"


def test_bad_input(triton_device):
    conv = CONVS[0]
    _, (x, w, b, keep, dy) = stacked_inputs(conv, torch.float32, triton_device, True)
    bits = torch.stack([pack_bits(k) for k in keep])
    with pytest.raises(ValueError, match=r"x must hold 3 models"):
        stacked_masked_conv2d_fwd(x[:2], w, bits, b, *conv.conv_args)
    with pytest.raises(ValueError, match=r"mask_bits must be contiguous with 3 models"):
        stacked_masked_conv2d_fwd(x, w, bits[:2], b, *conv.conv_args)
    with pytest.raises(ValueError, match=r"bias must have shape \(3, 4\)"):
        stacked_masked_conv2d_fwd(x, w, bits, b[:, :3], *conv.conv_args)
    with pytest.raises(ValueError, match=r"dy must have shape"):
        stacked_masked_conv2d_bwd_input(dy[:, :, :, :-1], w, bits, x.shape, *conv.conv_args)
    with pytest.raises(ValueError, match=r"x_shape must be 5 non-negative ints"):
        stacked_masked_conv2d_bwd_input(dy, w, bits, x.shape[1:], *conv.conv_args)
    with pytest.raises(ValueError, match=r"weight_shape must be 5 non-negative ints"):
        stacked_masked_conv2d_bwd_weight(dy, x, bits, w.shape[1:], *conv.conv_args)
    with pytest.raises(ValueError, match=r"groups: expected at most 65535 models \* groups \(3 \* 21846\)"):
        wide = torch.randn(3, 21846, 1, 1, 1)
        wide_bits = torch.zeros(3, 21846, 1, dtype=torch.int32)
        stacked_masked_conv2d_fwd(torch.randn(3, 1, 21846, 2, 2), wide, wide_bits, None, (1, 1), (0, 0), (1, 1),
                                  21846)
