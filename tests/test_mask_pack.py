"""sparse_engine::pack_mask / unpack_mask through the op layer (CPU kernel) against the reference."""
import pytest
import torch

from sparse_engine.ops import apply_mask_, apply_mask_ref, pack_mask, pack_mask_ref, unpack_mask, unpack_mask_ref
from sparse_engine.ops.mask_pack import packed_shape

SHAPES = [(1, 1), (7, 31), (5, 32), (3, 33), (97, 131), (4, 3, 3, 3), (2, 257)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("density", [0.0, 0.5, 0.99, 1.0])
def test_pack_matches_reference_and_roundtrips(shape, density):
    mask = torch.rand(shape) < density
    bits = pack_mask(mask)
    assert bits.dtype == torch.int32 and bits.is_contiguous()
    assert torch.equal(bits, pack_mask_ref(mask))
    assert torch.equal(unpack_mask(bits, shape), mask)
    assert torch.equal(unpack_mask_ref(bits, shape), mask)


def test_bit_order_and_sign_bit():
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 0] = True      # bit 0 of word 0
    mask[0, 31] = True     # bit 31 of word 0: the int32 sign bit
    mask[1, 33] = True     # bit 1 of word 1
    bits = pack_mask(mask)
    assert bits.tolist() == [[1 - 2**31, 0], [0, 2]]


def test_padding_bits_are_zero():
    bits = pack_mask(torch.ones(3, 33, dtype=torch.bool))
    assert bits[:, 1].tolist() == [1, 1, 1]
    assert bits[:, 0].tolist() == [-1, -1, -1]


def test_non_contiguous_mask():
    base = torch.rand(40, 70) < 0.5
    mask = base.t()[:, ::2]
    assert not mask.is_contiguous()
    assert torch.equal(unpack_mask(pack_mask(mask), mask.shape), mask)


def test_opcheck():
    mask = torch.rand(7, 45) < 0.5
    torch.library.opcheck(torch.ops.sparse_engine.pack_mask.default, (mask,))
    torch.library.opcheck(torch.ops.sparse_engine.unpack_mask.default, (pack_mask(mask), 45))


def test_bad_input():
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        pack_mask(torch.ones(3, 4))
    with pytest.raises(TypeError, match="mask: expected a torch.Tensor"):
        pack_mask([True, False])
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(3, 1\)"):
        unpack_mask(torch.zeros(3, 2, dtype=torch.int32), (3, 4))
    with pytest.raises(TypeError, match="mask_bits: expected an int32"):
        unpack_mask(torch.zeros(3, 1, dtype=torch.int64), (3, 4))
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(1, 1\) for a tensor of shape \(10,\)"):
        unpack_mask(torch.zeros(10, 1, dtype=torch.int32), (10,))
    with pytest.raises(ValueError, match="shape: expected non-negative ints"):
        unpack_mask(torch.zeros(1, 1, dtype=torch.int32), (-1, 4))
    with pytest.raises(ValueError, match="shape: expected non-negative ints"):
        unpack_mask(torch.zeros(1, 1, dtype=torch.int32), (1, 2.0))
    with pytest.raises(TypeError, match="shape: expected a sequence of ints"):
        unpack_mask(torch.zeros(1, 1, dtype=torch.int32), 4)


# Rank 0 and 1 are one row, (1, numel); rank >= 2 is (shape[0], prod(shape[1:])), also with shape[0] = 0.
ANY_RANK = [(), (1,), (10,), (0,), (33,), (0, 5), (3, 0), (2, 0, 3), (1, 1, 1, 1), (4, 3, 5, 7)]


@pytest.mark.parametrize("shape", ANY_RANK, ids=lambda s: "x".join(map(str, s)) or "0d")
def test_any_rank_roundtrips(shape):
    mask = torch.rand(shape) < 0.5
    bits = pack_mask(mask)
    rows = shape[0] if len(shape) >= 2 else 1
    cols = mask.numel() // rows if rows else int(torch.tensor(shape[1:]).prod())
    assert tuple(bits.shape) == packed_shape(shape) == (rows, (cols + 31) // 32)
    assert torch.equal(bits, pack_mask_ref(mask))
    for unpack in (unpack_mask, unpack_mask_ref):
        back = unpack(bits, shape)
        assert back.shape == mask.shape and torch.equal(back, mask)


# -- apply_mask_: zero the pruned elements in place, from the packed bits ------------------------

APPLY_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@pytest.mark.parametrize("dtype", APPLY_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_apply_mask_matches_reference(shape, dtype):
    t = (torch.randn(shape) + 3).to(dtype)  # no zeros before masking (bool: all True)
    mask = torch.rand(shape) < 0.5
    bits = pack_mask(mask)
    out = t.clone()
    assert apply_mask_(out, bits) is out
    assert torch.equal(out, apply_mask_ref(t.clone(), bits))
    assert torch.equal(out[mask], t[mask]) and not out[~mask].any()
    if dtype.is_floating_point:
        assert not out[~mask].signbit().any()  # +0, as masked_fill_ writes


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_apply_mask_non_contiguous(layout):
    if layout == "transposed":
        t = torch.randn(45, 37).t()
    elif layout == "sliced":
        t = torch.randn(37, 90)[:, ::2]
    else:
        t = torch.randn(6, 5, 3, 3).to(memory_format=torch.channels_last)
    mask = torch.rand(t.shape) < 0.5
    expected = apply_mask_ref(t.clone(), pack_mask(mask))
    base = t.clone(memory_format=torch.preserve_format) if layout == "channels_last" else t
    apply_mask_(base, pack_mask(mask))
    assert torch.equal(base, expected)


def test_apply_mask_opcheck_and_compile():
    t, mask = torch.randn(7, 45), torch.rand(7, 45) < 0.5
    torch.library.opcheck(torch.ops.sparse_engine.apply_mask_.default, (t.clone(), pack_mask(mask)))

    def f(w, bits):
        apply_mask_(w, bits)
        return w * 2

    w = t.clone()
    out = torch.compile(f, fullgraph=True)(w, pack_mask(mask))
    assert torch.equal(w, t.masked_fill(~mask, 0)) and torch.equal(out, 2 * w)


def test_apply_mask_bad_input():
    with pytest.raises(TypeError, match="t: expected a torch.Tensor"):
        apply_mask_([1.0], torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"mask_bits: expected shape \(3, 1\)"):
        apply_mask_(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="mask_bits: expected an int32"):
        apply_mask_(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="t: expected a real dtype"):
        apply_mask_(torch.randn(3, 4, dtype=torch.complex64), torch.zeros(3, 1, dtype=torch.int32))
