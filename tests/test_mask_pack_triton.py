"""Triton mask pack/unpack kernels (kernels/mask_pack.py) against a pure-torch bit packer.

On a machine without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (see conftest.py).
"""
import pytest
import torch

from sparse_engine.kernels.mask_pack import apply_mask_fwd, masked_copy_fwd, pack_mask_fwd, unpack_mask_fwd


def pack_ref(mask: torch.Tensor) -> torch.Tensor:
    """bool (R, C) -> int32 (R, ceil(C/32)) by plain integer arithmetic, bit j of word w = column 32w+j."""
    rows, cols = mask.shape
    words = -(-cols // 32)
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :cols] = mask.cpu().to(torch.int64)
    value = (padded.view(rows, words, 32) << torch.arange(32)).sum(-1)  # in [0, 2**32)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


@pytest.mark.parametrize("cols", [1, 31, 32, 33, 64, 97, 257], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("rows", [1, 131], ids=lambda r: f"R{r}")
def test_pack_unpack_random(triton_device, rows, cols):
    mask = torch.rand(rows, cols) < 0.5
    bits = pack_mask_fwd(mask.to(triton_device))
    assert bits.dtype == torch.int32 and bits.shape == (rows, -(-cols // 32)) and bits.is_contiguous()
    assert torch.equal(bits.cpu(), pack_ref(mask))
    unpacked = unpack_mask_fwd(bits, cols)
    assert unpacked.dtype == torch.bool and unpacked.shape == (rows, cols) and unpacked.is_contiguous()
    assert torch.equal(unpacked.cpu(), mask)


# All-kept rows spell out the format independently of pack_ref: bit 31 makes a full word -1, and a
# partial last word holds exactly its low (cols % 32) bits, with the padding bits 0.
ALL_KEPT = [(1, [1]), (32, [-1]), (33, [-1, 1]), (64, [-1, -1]), (70, [-1, -1, 0b111111]), (97, [-1, -1, -1, 1])]


@pytest.mark.parametrize("cols, words", ALL_KEPT, ids=[f"C{c}" for c, _ in ALL_KEPT])
def test_pack_all_kept(triton_device, cols, words):
    mask = torch.ones(3, cols, dtype=torch.bool, device=triton_device)
    expected = torch.tensor([words] * 3, dtype=torch.int32)
    assert torch.equal(pack_mask_fwd(mask).cpu(), expected)
    assert unpack_mask_fwd(expected.to(triton_device), cols).all()
    assert not pack_mask_fwd(~mask).any()


def test_pack_bit31_alone(triton_device):
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 31] = True
    mask[1, 63] = True
    bits = pack_mask_fwd(mask.to(triton_device)).cpu()
    assert bits.tolist() == [[-2**31, 0], [0, -2**31]]
    assert torch.equal(unpack_mask_fwd(bits.to(triton_device), 64).cpu(), mask)


def test_pack_uint8_nonzero_is_kept(triton_device):
    values = (torch.randint(0, 3, (7, 97)) * torch.randint(1, 128, (7, 97))).to(torch.uint8)
    bits = pack_mask_fwd(values.to(triton_device))
    assert torch.equal(bits.cpu(), pack_ref(values != 0))


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_pack_non_contiguous(triton_device, layout):
    if layout == "transposed":
        mask = (torch.rand(97, 7) < 0.5).T
    else:
        mask = (torch.rand(14, 291) < 0.5)[::2, 1::3]
    assert not mask.is_contiguous() and mask.shape == (7, 97)
    bits = pack_mask_fwd(mask.to(triton_device))
    assert torch.equal(bits.cpu(), pack_ref(mask))


def test_unpack_strided_words_and_ignores_padding(triton_device):
    mask = torch.rand(7, 33) < 0.5
    bits = pack_ref(mask)
    bits[:, 1] |= ~1  # garbage in the 31 padding bits of the last word
    wide = torch.zeros(7, 4, dtype=torch.int32)
    wide[:, ::2] = bits
    strided = wide.to(triton_device)[:, ::2]
    assert not strided.is_contiguous()
    assert torch.equal(unpack_mask_fwd(strided, 33).cpu(), mask)


def test_empty(triton_device):
    assert pack_mask_fwd(torch.zeros(0, 40, dtype=torch.bool, device=triton_device)).shape == (0, 2)
    assert unpack_mask_fwd(torch.zeros(5, 0, dtype=torch.int32, device=triton_device), 0).shape == (5, 0)


def test_errors(triton_device):
    with pytest.raises(ValueError, match="mask: expected dtype"):
        pack_mask_fwd(torch.ones(4, 4, device=triton_device))
    with pytest.raises(ValueError, match="mask: expected a 2-D"):
        pack_mask_fwd(torch.ones(4, dtype=torch.bool, device=triton_device))
    with pytest.raises(ValueError, match="bits: expected a 2-D torch.int32"):
        unpack_mask_fwd(torch.zeros(4, 2, dtype=torch.int64, device=triton_device), 40)
    with pytest.raises(ValueError, match=r"bits: expected 2 words a row \(ceil\(cols/32\) for cols=40\), got 3"):
        unpack_mask_fwd(torch.zeros(4, 3, dtype=torch.int32, device=triton_device), 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 33), (131, 97), (17, 257)], ids=lambda v: str(v))
def test_apply_mask(triton_device, rows, cols, dtype):
    t = (torch.randn(rows, cols) + 3).to(dtype)  # no zeros before masking
    mask = torch.rand(rows, cols) < 0.5
    out = t.to(triton_device)
    apply_mask_fwd(out, pack_ref(mask).to(triton_device))
    assert torch.equal(out.cpu(), t.masked_fill(~mask, 0))
    assert not out.cpu()[~mask].signbit().any()


def test_apply_mask_strided_and_partial_words(triton_device):
    # A transposed view: element strides (1, rows); the last word of each row is partial, and the
    # elements past it (the next column of the base) must not be written.
    base = torch.randn(40, 9) + 3
    t = base.t().to(triton_device)[:, :37]
    mask = torch.rand(9, 37) < 0.5
    expected = base.clone()
    expected.t()[:, :37].masked_fill_(~mask, 0)
    apply_mask_fwd(t, pack_ref(mask).to(triton_device))
    assert torch.equal(t.cpu(), expected.t()[:, :37])


def test_apply_mask_errors(triton_device):
    with pytest.raises(ValueError, match="t: expected a 2-D"):
        apply_mask_fwd(torch.ones(4, device=triton_device), torch.zeros(4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"bits: expected a contiguous torch.int32 tensor of shape \(4, 2\)"):
        apply_mask_fwd(torch.ones(4, 40, device=triton_device), torch.zeros(4, 3, dtype=torch.int32,
                                                                          device=triton_device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 33), (131, 97)], ids=lambda v: str(v))
def test_masked_copy(triton_device, rows, cols, dtype):
    t = (torch.randn(rows, cols) + 3).to(dtype)
    t[0, 0] = float("nan")  # pruned or kept, a NaN must stay where it is
    mask = torch.rand(rows, cols) < 0.5
    out = masked_copy_fwd(t.to(triton_device), pack_ref(mask).to(triton_device)).cpu()
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out[mask], t[mask]) or (mask[0, 0] and out[mask].isnan().sum() == 1)
    assert (out[~mask] == 0).all() and not out[~mask].signbit().any()


def test_masked_copy_strided(triton_device):
    base = torch.randn(40, 9)
    t = base.t().to(triton_device)[:, :37]
    mask = torch.rand(9, 37) < 0.5
    out = masked_copy_fwd(t, pack_ref(mask).to(triton_device))
    assert torch.equal(out.cpu(), base.t()[:, :37] * mask)
