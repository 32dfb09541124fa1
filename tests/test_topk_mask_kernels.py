"""The compiled topk_mask kernels, `sparse_engine._C.topk_mask`, against `topk_mask_ref`.

Every mask must equal the reference bit for bit: the rule (rank by score, ties broken by tensor
index, then flat index; -0.0 == +0.0) leaves no freedom, so inputs with heavy ties are compared
exactly too. On top: exactly ks[g] bits per group, every kept score >= every dropped one (<= for
largest=False), NaN -> ValueError naming the tensor. The CPU kernel runs a group on one thread
or splits it over all threads depending on its size, so tests run both with 1 and 2 threads.
CUDA variants run under `pytest -m gpu` where the CUDA kernels are built.
"""
import pytest
import torch

from sparse_engine import _C
from sparse_engine.ops.topk_mask import selection_shape, topk_mask_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# Odd sizes. Rank <= 1 is viewed as (1, n), rank >= 2 as (shape[0], rest): (4, 3, 5, 7) as
# (4, 105). Rows of 7, 33, 97, 105, 131, 257 columns end in partial, zero-padded words.
SHAPES = [(1,), (7,), (97,), (131,), (257,), (5, 7), (3, 33), (2, 131), (4, 3, 5, 7), (1, 1)]
# A group this large is split over threads by the CPU kernel (from 32768 scores, and a quarter
# of the call's scores per thread), into chunks of 65536 scores.
LARGE = 100_000


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def tie_free(shape, dtype):
    """Scores without ties: distinct bit patterns of every sign and magnitude (no -0.0, inf, NaN)."""
    n = torch.Size(shape).numel()
    if dtype == torch.float32:
        values = torch.randint(-2**31, 2**31, (2 * n + 64,), dtype=torch.int64).to(torch.int32).unique()
        values = values.view(torch.float32)
    else:
        values = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    f = values.float()
    values = values[torch.isfinite(f) & ~((f == 0) & torch.signbit(f))]
    assert values.numel() >= n, "not enough distinct values for a tie-free tensor of this size"
    return values[torch.randperm(values.numel())[:n]].reshape(shape)


def tie_free_list(shapes, dtype):
    """Tensors of these shapes without ties, also across tensors."""
    sizes = [torch.Size(s).numel() for s in shapes]
    flat = tie_free((sum(sizes),), dtype)
    return [part.reshape(s) for part, s in zip(flat.split(sizes), shapes)]


def unpack(bits: torch.Tensor, shape) -> torch.Tensor:
    """Packed words (rows, words) -> bool mask of the flattened scores."""
    rows, cols = selection_shape(shape)
    shifts = torch.arange(32, dtype=torch.int64)
    flags = ((bits.cpu().to(torch.int64).unsqueeze(-1) >> shifts) & 1).bool()
    return flags.reshape(rows, bits.shape[1] * 32)[:, :cols].reshape(-1)


def run_and_check(scores, group, ks, largest, device="cpu"):
    """_C.topk_mask on `device` equals the reference bit for bit, with the invariants of the rule."""
    scores = [s.to(device) for s in scores]
    # Leave poisoned blocks of the masks' sizes behind, for the allocator to hand out again.
    shapes = [(rows, (cols + 31) // 32) for rows, cols in (selection_shape(s.shape) for s in scores)]
    poison = [torch.full(shape, -1, dtype=torch.int32, device=device) for shape in shapes]
    del poison
    out = _C.topk_mask(scores, group, ks, largest)
    ref = topk_mask_ref([s.cpu() for s in scores], group, ks, largest)
    assert len(out) == len(scores)
    for i, (o, r, s, shape) in enumerate(zip(out, ref, scores, shapes)):
        assert o.dtype == torch.int32 and o.device == s.device and o.is_contiguous(), f"mask {i}"
        assert tuple(o.shape) == shape, f"mask {i}: shape {tuple(o.shape)}, expected {shape}"
        mismatch = (o.cpu() != r).sum().item()
        assert mismatch == 0, f"mask {i}: {mismatch} of {o.numel()} words differ from topk_mask_ref"
    for g, k in enumerate(ks):
        members = [i for i, gi in enumerate(group) if gi == g]
        if not members:
            continue
        kept = torch.cat([unpack(out[i], scores[i].shape) for i in members])
        values = torch.cat([scores[i].cpu().reshape(-1).float() for i in members])
        assert kept.sum().item() == k, f"group {g}: {kept.sum().item()} bits set, expected {k}"
        if 0 < k < values.numel():
            best, rest = (values[kept], values[~kept]) if largest else (-values[kept], -values[~kept])
            assert best.min() >= rest.max(), f"group {g}: a dropped score beats a kept one"
    return out


def k_values(n):
    return sorted({0, 1, n // 3, n - 1, n} & set(range(n + 1)))


# --------------------------------------------------------------------------------------------
# Tie-free inputs

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_one_group_many_tensors(dtype, largest, device, threads):
    scores = tie_free_list(SHAPES, dtype)
    n = sum(s.numel() for s in scores)
    for k in k_values(n):
        run_and_check(scores, [0] * len(scores), [k], largest, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_several_groups(dtype, largest, device, threads):
    scores = tie_free_list(SHAPES, dtype)
    group = [i % 3 for i in range(len(SHAPES))]  # interleaved: tensor order is not group order
    sizes = [sum(s.numel() for s, g in zip(scores, group) if g == gi) for gi in range(3)]
    for pick in range(5):
        ks = [k_values(n)[min(pick, len(k_values(n)) - 1)] for n in sizes]
        run_and_check(scores, group, ks, largest, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_large_tensor(largest, device, threads):
    """A 1e5-score tensor (split over threads when there are several) beside small ones."""
    scores = tie_free_list([(LARGE,), (97,), (7, 131), (2, 3, 5, 7)], torch.float32)
    n = sum(s.numel() for s in scores)
    for k in (0, 1, 12345, n // 2, n - 1, n):
        run_and_check(scores, [0] * 4, [k], largest, device)
    run_and_check(scores, [1, 0, 0, 1], [50, LARGE // 3], largest, device)


@pytest.mark.parametrize("device", DEVICES)
def test_per_tensor_groups(device, threads):
    """One group per tensor, as in layer-wise pruning (each group on one thread)."""
    scores = [torch.randn(shape) for shape in SHAPES] + [torch.randn(LARGE // 4)]
    ks = [s.numel() // 2 for s in scores]
    run_and_check(scores, list(range(len(scores))), ks, True, device)


# --------------------------------------------------------------------------------------------
# Ties and special values

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_heavy_ties(dtype, largest, device, threads):
    """Scores in {0, 1, 2}: the threshold is shared by a third of the scores and the tie-break
    (tensor index, then flat index) decides which of them are kept."""
    scores = [torch.randint(0, 3, shape).to(dtype) for shape in SHAPES]
    n = sum(s.numel() for s in scores)
    for k in (1, n // 3, n // 2, 2 * n // 3 + 1, n - 1):
        run_and_check(scores, [0] * len(scores), [k], largest, device)
    group = [i % 2 for i in range(len(scores))]
    sizes = [sum(s.numel() for s, g in zip(scores, group) if g == gi) for gi in range(2)]
    run_and_check(scores, group, [sizes[0] // 2, sizes[1] // 3], largest, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_heavy_ties_large(dtype, device, threads):
    """Ties spread over the chunks of a group that is split over threads: ranks cross chunks."""
    scores = [torch.randint(0, 3, (LARGE,)).to(dtype), torch.randint(0, 3, (3, 1000)).to(dtype)]
    n = LARGE + 3000
    for k in (1, n // 2, n - 1):
        run_and_check(scores, [0, 0], [k], True, device)
    run_and_check(scores, [1, 0], [1500, LARGE // 2 + 1], False, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_signed_zeros_are_equal(dtype, device):
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0, -0.0, 0.0, 0.0, -0.0], dtype=dtype)
    assert torch.signbit(zeros).any()
    for largest in (True, False):
        for k in range(9):
            out = run_and_check([zeros], [0], [k], largest, device)
            # All tie: the first k flat indices win, whatever their sign.
            assert out[0].item() == (1 << k) - 1
    mixed = torch.tensor([1.0, -0.0, -1.0, 0.0, 2.0, -0.0], dtype=dtype)
    for k in range(7):
        run_and_check([mixed, -mixed], [0, 0], [k], True, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_infinities(dtype, device):
    inf = float("inf")
    scores = [torch.tensor([inf, -inf, 1.0, -2.0, inf, 0.0, -inf, 3.0], dtype=dtype),
              torch.tensor([[-inf, inf], [0.5, -inf]], dtype=dtype), torch.full((40,), inf, dtype=dtype)]
    n = sum(s.numel() for s in scores)
    for largest in (True, False):
        for k in range(0, n + 1, 3):
            run_and_check(scores, [0, 0, 0], [k], largest, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_nan_raises(dtype, device):
    scores = [torch.randn(7), torch.randn(3, 33), torch.randn(97), torch.randn(5)]
    scores = [s.to(device=device, dtype=dtype) for s in scores]
    scores[2][40] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[2\]: contains NaN"):
        _C.topk_mask(scores, [0, 0, 0, 0], [50], True)
    # Also where the group's k needs no search (k == 0, k == n), and as -NaN; the lowest index wins.
    scores[3][4] = -float("nan")
    with pytest.raises(ValueError, match=r"scores\[2\]: contains NaN"):
        _C.topk_mask(scores, [0, 1, 0, 1], [0, 104], False)
    with pytest.raises(ValueError, match=r"scores\[1\]: contains NaN"):
        _C.topk_mask([scores[0], scores[3]], [0, 0], [5], True)
    big = torch.randn(LARGE).to(device=device, dtype=dtype)
    big[LARGE - 1] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\]: contains NaN"):
        _C.topk_mask([scores[0], big], [0, 0], [10], True)


# --------------------------------------------------------------------------------------------
# Shapes and arguments

@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_single_element_tensors(device, threads):
    scores = [torch.randn(0), torch.randn(1), torch.randn(0, 5), torch.randn(3, 0), torch.randn(1, 1),
              torch.randn(2, 0, 3), torch.randn(33)]
    n = 1 + 1 + 33
    for k in k_values(n):
        run_and_check(scores, [0] * len(scores), [k], True, device)
    # A group of empty tensors only, and a group with no tensors: k must be 0.
    run_and_check(scores, [1, 0, 1, 1, 0, 1, 0], [20, 0, 0], False, device)
    assert _C.topk_mask([], [], [0], True) == []


def test_argument_errors():
    s = [torch.randn(10), torch.randn(3, 4)]
    with pytest.raises(ValueError, match=r"group must have one entry per score tensor \(2\), got 1"):
        _C.topk_mask(s, [0], [1], True)
    with pytest.raises(ValueError, match=r"group\[1\] must be in \[0, 1\)"):
        _C.topk_mask(s, [0, 1], [1], True)
    with pytest.raises(ValueError, match=r"ks\[0\] must be in \[0, 22\]"):
        _C.topk_mask(s, [0, 0], [23], True)
    with pytest.raises(ValueError, match=r"ks\[1\] must be in \[0, 12\]"):
        _C.topk_mask(s, [0, 1], [3, -1], True)
    with pytest.raises(RuntimeError, match=r"scores\[0\] must be float32, float16 or bfloat16"):
        _C.topk_mask([s[0].double(), s[1].double()], [0, 0], [1], True)
    with pytest.raises(RuntimeError, match=r"scores\[1\] must have the dtype of scores\[0\]"):
        _C.topk_mask([s[0], s[1].half()], [0, 0], [1], True)
    with pytest.raises(RuntimeError, match=r"scores\[1\] must be contiguous"):
        _C.topk_mask([s[0], s[1].t()], [0, 0], [1], True)
    with pytest.raises(RuntimeError, match=r"scores\[0\] must be a CPU or CUDA tensor"):
        _C.topk_mask([torch.randn(3, device="meta")], [0], [1], True)
