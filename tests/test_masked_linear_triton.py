"""Triton masked_linear GEMMs (kernels/masked_linear.py) against float64 torch references.

On a machine without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (see conftest.py);
the interpreter has no bfloat16, so bf16 cases are GPU-only. Masks are packed here by plain integer
arithmetic, independently of the pack kernels.

Tolerances:
- fp32, fp64 (exact products): |err| <= K * eps * max(|x| @ |W*M|^T), the textbook bound on a
  K-term dot product; a single wrong mask bit moves an output by ~|x w| ~ 1, far above it.
- fp16/bf16: at most 2x the error of torch doing the same product at that precision with fp32
  accumulation and one final rounding (as cuBLAS does), plus one ulp of the largest output for
  cases where that baseline happens to be exact. The baseline is spelled out in fp32 rather than
  taken from torch's fp16 CPU matmul, whose accumulation precision depends on the CPU backend.
"""
import pytest
import torch

from sparse_engine.kernels.masked_linear import masked_linear_bwd_input, masked_linear_bwd_weight, masked_linear_fwd

fp16, bf16, fp32, fp64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
NAMES = {fp16: "fp16", bf16: "bf16", fp32: "fp32", fp64: "fp64"}


def pack_ref(mask: torch.Tensor) -> torch.Tensor:
    rows, cols = mask.shape
    words = -(-cols // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :cols] = mask.cpu().to(torch.int64)
    value = (padded.view(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def make(shape, dtype, device, layout="contig"):
    """Random normal matrix of `shape` stored contiguously, column-major, or as a strided slice."""
    rows, cols = shape
    if layout == "contig":
        return torch.randn(rows, cols).to(dtype).to(device)
    if layout == "transposed":
        return torch.randn(cols, rows).to(dtype).to(device).T
    big = torch.randn(2 * rows, 3 * cols).to(dtype).to(device)
    return big[::2, 1::3]


def random_mask(rows, cols, sparsity, device):
    mask = torch.rand(rows, cols) >= sparsity
    return mask.to(device), pack_ref(mask).to(device)


def check_close(out, ref64, baseline, abs_scale, k):
    """out: kernel result; ref64: float64 reference; baseline: torch at out's precision (fp32 accumulate)."""
    assert torch.isfinite(out).all()
    err = (out.double() - ref64).abs().max().item()
    if out.dtype in (fp32, fp64):
        bound = k * torch.finfo(out.dtype).eps * abs_scale
    else:
        base_err = (baseline.double() - ref64).abs().max().item()
        bound = 2 * base_err + torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


# (M, N, K, dtype, sparsity): every size in {1, 7, 97, 131} on every axis, every sparsity, every
# interpreter dtype; K = 1 and 7 (one partial word), 64 (two full words), 97 and 131 (full words,
# bit 31 set in about half of them, then a partial word).
CASES = [
    (1, 131, 97, fp32, 0.5),
    (1, 97, 131, fp16, 0.99),
    (7, 97, 131, fp32, 0.0),
    (7, 131, 97, fp16, 0.5),
    (97, 7, 1, fp32, 0.99),
    (97, 7, 1, fp16, 0.0),
    (131, 1, 7, fp32, 1.0),
    (131, 1, 7, fp16, 0.5),
    (97, 131, 7, fp16, 1.0),
    (131, 97, 64, fp32, 0.5),
    (7, 97, 131, fp64, 0.5),  # fp64 accumulates in fp64
]
NON_CONTIGUOUS = [(7, 131, 97, fp32, 0.5), (97, 7, 131, fp16, 0.5)]
GPU_CASES = [
    (1, 4096, 4096, bf16, 0.5),
    (257, 1031, 519, bf16, 0.9),
    (257, 1031, 519, fp16, 0.5),
    (1031, 257, 4099, bf16, 0.0),
]


def case_id(case):
    m, n, k, dtype, s = case
    return f"M{m}-N{n}-K{k}-{NAMES[dtype]}-s{s}"


def params(cases, layouts=("contig",), marks=()):
    return [pytest.param(*case, layout, id=f"{case_id(case)}-{layout}", marks=marks)
            for case in cases for layout in layouts]


ALL = (params(CASES) + params(NON_CONTIGUOUS, ("transposed", "strided"))
       + params(GPU_CASES, ("contig", "transposed"), marks=pytest.mark.gpu))
SIGNATURE = "m, n, k, dtype, sparsity, layout"


@pytest.mark.parametrize(SIGNATURE, ALL)
def test_fwd(triton_device, m, n, k, dtype, sparsity, layout):
    x = make((m, k), dtype, triton_device, layout)
    w = make((n, k), dtype, triton_device, layout)
    b = make((1, n), dtype, triton_device)[0]
    mask, bits = random_mask(n, k, sparsity, triton_device)

    y = masked_linear_fwd(x, w, bits, b)
    assert y.shape == (m, n) and y.dtype == dtype and y.is_contiguous()

    wm = w * mask
    ref = x.double() @ wm.double().T + b.double()
    baseline = (x.float() @ wm.float().T + b.float()).to(dtype)
    check_close(y, ref, baseline, (x.double().abs() @ wm.double().abs().T).max().item(), k)


NO_BIAS = [(7, 131, 97, fp32, 0.5), (97, 7, 33, fp16, 0.5)]


@pytest.mark.parametrize("m, n, k, dtype, sparsity", NO_BIAS, ids=[case_id(c) for c in NO_BIAS])
def test_fwd_without_bias(triton_device, m, n, k, dtype, sparsity):
    x = make((m, k), dtype, triton_device)
    w = make((n, k), dtype, triton_device)
    mask, bits = random_mask(n, k, sparsity, triton_device)
    wm = w * mask
    ref = x.double() @ wm.double().T
    check_close(masked_linear_fwd(x, w, bits), ref, (x.float() @ wm.float().T).to(dtype),
                (x.double().abs() @ wm.double().abs().T).max().item(), k)


@pytest.mark.parametrize(SIGNATURE, ALL)
def test_bwd_input(triton_device, m, n, k, dtype, sparsity, layout):
    dy = make((m, n), dtype, triton_device, layout)
    w = make((n, k), dtype, triton_device, layout)
    mask, bits = random_mask(n, k, sparsity, triton_device)

    dx = masked_linear_bwd_input(dy, w, bits)
    assert dx.shape == (m, k) and dx.dtype == dtype and dx.is_contiguous()

    wm = w * mask
    ref = dy.double() @ wm.double()
    baseline = (dy.float() @ wm.float()).to(dtype)
    check_close(dx, ref, baseline, (dy.double().abs() @ wm.double().abs()).max().item(), n)


@pytest.mark.parametrize(SIGNATURE, ALL)
def test_bwd_weight(triton_device, m, n, k, dtype, sparsity, layout):
    dy = make((m, n), dtype, triton_device, layout)
    x = make((m, k), dtype, triton_device, layout)
    mask, bits = random_mask(n, k, sparsity, triton_device)

    dw = masked_linear_bwd_weight(dy, x, bits)
    assert dw.shape == (n, k) and dw.dtype == dtype and dw.is_contiguous()
    assert (dw[~mask] == 0).all()

    ref = (dy.double().T @ x.double()) * mask
    baseline = (dy.float().T @ x.float()).to(dtype) * mask
    check_close(dw, ref, baseline, ((dy.double().abs().T @ x.double().abs()) * mask).max().item(), m)


def test_bwd_weight_pruned_row_blocks(triton_device):
    """Whole pruned row blocks skip their reduction; the tiles around them must still be computed."""
    m, n, k = 97, 131, 97
    dy = make((m, n), fp32, triton_device)
    x = make((m, k), fp32, triton_device)
    mask = torch.rand(n, k) < 0.5
    mask[:70] = False
    mask[100:110, 40:] = False
    bits = pack_ref(mask).to(triton_device)
    mask = mask.to(triton_device)

    dw = masked_linear_bwd_weight(dy, x, bits)
    assert (dw[~mask] == 0).all()
    ref = (dy.double().T @ x.double()) * mask
    check_close(dw, ref, None, ((dy.double().abs().T @ x.double().abs()) * mask).max().item(), m)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", [(257, 1031, 519), (1, 4096, 4096)], ids=["M257-N1031-K519", "M1-N4096-K4096"])
def test_fp32_allow_tf32(triton_device, m, n, k):
    """TF32 rounds each operand to 10 mantissa bits (relative error 2^-11 each), so every product
    is off by at most 2^-10 relative, on top of the fp32 accumulation bound. The exact fp32 path on
    the same inputs must be far more accurate, or the flag was not wired through."""
    x, w = make((m, k), fp32, triton_device), make((n, k), fp32, triton_device)
    mask, bits = random_mask(n, k, 0.5, triton_device)
    wm = (w * mask).double()
    ref = x.double() @ wm.T
    scale = (x.double().abs() @ wm.abs().T).max().item()
    y = masked_linear_fwd(x, w, bits, allow_tf32=True)
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs().max().item()
    assert err <= (2.0**-10 + k * torch.finfo(fp32).eps) * scale
    err_ieee = (masked_linear_fwd(x, w, bits).double() - ref).abs().max().item()
    assert err_ieee < err / 10


def test_errors(triton_device):
    x = make((7, 40), fp32, triton_device)
    w = make((5, 40), fp32, triton_device)
    bits = pack_ref(torch.ones(5, 40, dtype=torch.bool)).to(triton_device)
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(5, 2\)"):
        masked_linear_fwd(x, w, bits[:, :1])
    with pytest.raises(ValueError, match=r"mask_bits: expected dtype torch.int32"):
        masked_linear_fwd(x, w, bits.long())
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(5, 2\)"):
        masked_linear_bwd_input(make((7, 5), fp32, triton_device), w, bits[:4])
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(5, 2\)"):
        masked_linear_bwd_weight(make((7, 5), fp32, triton_device), x, bits.T.contiguous())
    with pytest.raises(ValueError, match=r"weight: expected shape \(5, 40\)"):
        masked_linear_fwd(x, w[:, :39], bits)
    with pytest.raises(ValueError, match="weight: expected dtype torch.float32"):
        masked_linear_fwd(x, w.half(), bits)
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        masked_linear_fwd(x, w, bits, torch.zeros(6, device=triton_device))
    with pytest.raises(ValueError, match="x: expected dtype"):
        masked_linear_fwd(x.int(), w.int(), bits)
    with pytest.raises(ValueError, match=r"dy: expected shape \(7, 5\)"):
        masked_linear_bwd_weight(make((6, 5), fp32, triton_device), x, bits)


def test_autotune_keys_are_bucketed():
    """The token count M enters the autotune key only as a power-of-two bucket: variable-length
    inference would otherwise re-run the autotuner's timings for most calls."""
    from sparse_engine.kernels import masked_linear as ml
    for kernel in (ml._masked_linear_fwd_kernel, ml._masked_linear_bwd_input_kernel,
                   ml._masked_linear_bwd_weight_kernel):
        assert "M_BUCKET" in kernel.keys and "M" not in kernel.keys, kernel.keys


@pytest.mark.gpu
def test_fp64_refused_on_cuda():
    x = make((7, 40), fp64, "cuda")
    w = make((5, 40), fp64, "cuda")
    bits = pack_ref(torch.ones(5, 40, dtype=torch.bool)).to("cuda")
    with pytest.raises(ValueError, match="x: float64 is not supported on CUDA"):
        masked_linear_fwd(x, w, bits)
    with pytest.raises(ValueError, match="dy: float64 is not supported on CUDA"):
        masked_linear_bwd_input(make((7, 5), fp64, "cuda"), w, bits)
