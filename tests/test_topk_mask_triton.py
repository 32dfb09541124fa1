"""Triton topk_mask kernels (kernels/topk_mask.py) against sparse_engine.ops.topk_mask.topk_mask_ref.

The launcher is called directly: through the op, dispatch would pick the CPU kernel. On a machine
without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (see conftest.py), where the
interpreter has no bfloat16 (bf16 cases are GPU-only) and chunks are 4 words (128 scores), so the
small tensors here span several chunks and tie ranks cross chunk and tensor boundaries.

Every case checks, besides bit equality with the reference: exactly ks[g] bits per group, padding
bits 0, and kept scores >= dropped scores (<= for largest=False), from the unpacked masks.
"""
import pytest
import torch

from sparse_engine.kernels import topk_mask as kernel
from sparse_engine.kernels.topk_mask import topk_mask_fwd
from sparse_engine.ops.topk_mask import topk_mask_ref

fp16, bf16, fp32 = torch.float16, torch.bfloat16, torch.float32
NAMES = {fp16: "fp16", bf16: "bf16", fp32: "fp32"}
DTYPES = pytest.mark.parametrize("dtype", [fp32, fp16], ids=NAMES.get)
LARGEST = pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])


def shape_id(shapes):
    return "+".join("x".join(map(str, s)) or "scalar" for s in shapes)


def distinct_scores(shapes, dtype, device):
    """Tie-free scores of mixed sign: a random permutation of integers / 8, exact in fp16 for
    fewer than 2048 scores; fp32 gets normal samples (all exponents) checked to be distinct."""
    sizes = [torch.Size(s).numel() for s in shapes]
    n = sum(sizes)
    if dtype == fp32:
        flat = torch.randn(n)
    else:
        assert n <= 2048
        flat = (torch.randperm(n) - n // 2).float() / 8
    assert torch.unique(flat).numel() == n
    return [part.reshape(s).to(dtype).to(device) for part, s in zip(flat.split(sizes), shapes)]


def unpack(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed (rows, words) int32 -> flat keep flags; asserts the padding bits are 0."""
    rows, words = bits.shape
    cols = numel // rows if rows else 0
    flags = ((bits.cpu().to(torch.int64)[..., None] >> torch.arange(32)) & 1).bool().reshape(rows, words * 32)
    assert not flags[:, cols:].any(), "padding bits set"
    return flags[:, :cols].reshape(-1)


def check(scores, group, ks, largest):
    out = topk_mask_fwd(scores, group, ks, largest)
    ref = topk_mask_ref([s.cpu() for s in scores], group, ks, largest)
    assert len(out) == len(scores)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == torch.int32 and o.is_contiguous() and o.device == scores[i].device
        assert torch.equal(o.cpu(), r), f"mask of scores[{i}] differs from the reference"
    for g, k in enumerate(ks):
        members = [i for i, gi in enumerate(group) if gi == g]
        if not members:
            continue
        values = torch.cat([scores[i].cpu().reshape(-1).float() for i in members])
        kept = torch.cat([unpack(out[i], scores[i].numel()) for i in members])
        assert kept.sum().item() == k, f"group {g}: {kept.sum().item()} kept, expected {k}"
        if 0 < k < values.numel():
            if largest:
                assert values[kept].min() >= values[~kept].max()
            else:
                assert values[kept].max() <= values[~kept].min()
    return out


ONE_GROUP = [(7, 97), (131,), (3, 5, 2, 9)]  # 679 + 131 + 270 = 1080 scores


@pytest.mark.parametrize("k", ["third", "n-1"])
@LARGEST
@DTYPES
def test_random_one_group(triton_device, dtype, largest, k):
    scores = distinct_scores(ONE_GROUP, dtype, triton_device)
    n = sum(s.numel() for s in scores)
    check(scores, [0, 0, 0], [{"third": n // 3, "n-1": n - 1}[k]], largest)


# Eight tensors in five interleaved groups whose ks are 0, 1, n-1, n and n/2 (group 4 holds only
# the scalar tensor and the one-element tensor).
GROUPS_SHAPES = [(2, 3, 4, 5), (257,), (1, 131), (97, 7), (), (13, 1, 1, 7), (1,), (33, 2)]
GROUPS = [0, 1, 2, 3, 4, 0, 4, 2]


@LARGEST
@DTYPES
def test_random_groups(triton_device, dtype, largest):
    scores = distinct_scores(GROUPS_SHAPES, dtype, triton_device)
    sizes = [0] * 5
    for s, g in zip(scores, GROUPS):
        sizes[g] += s.numel()
    check(scores, GROUPS, [0, 1, sizes[2] - 1, sizes[3], sizes[4] // 2], largest)


# Scores in {0, 1, 2}: the threshold value is shared by hundreds of scores across tensors and
# chunks, and which of them are kept is decided by the (tensor, flat index) tie-break alone.
TIES_SHAPES = [(5, 77), (300,), (2, 3, 33), (40, 1)]


@pytest.mark.parametrize("split", ["low-high", "mid-mid"])
@LARGEST
@DTYPES
def test_heavy_ties(triton_device, dtype, largest, split):
    scores = [torch.randint(0, 3, s).to(dtype).to(triton_device) for s in TIES_SHAPES]
    group = [0, 1, 0, 1]
    ks = []
    for g, where in enumerate(split.split("-")):
        values = torch.cat([s.cpu().reshape(-1) for s, gi in zip(scores, group) if gi == g])
        better = (values > 1).sum() if largest else (values < 1).sum()  # ahead of the ties at 1
        ties = (values == 1).sum()
        ks.append(int(better + {"low": 1, "mid": ties // 2, "high": ties - 1}[where]))
    check(scores, group, ks, largest)


@DTYPES
def test_signed_zeros_tie(triton_device, dtype):
    """-0.0 == +0.0: they tie, and the earlier one wins whatever its sign."""
    scores = [torch.tensor([0.0, -0.0, 1.0], dtype=dtype, device=triton_device),
              torch.tensor([-0.0, 0.0, -1.0], dtype=dtype, device=triton_device)]
    out = check(scores, [0, 0], [3], True)  # 1.0, then the first two zeros
    assert [unpack(o, 3).tolist() for o in out] == [[True, True, True], [False, False, False]]
    out = check(scores, [0, 0], [4], False)  # -1.0, then the first three zeros
    assert [unpack(o, 3).tolist() for o in out] == [[True, True, False], [True, False, True]]
    # Scores in {-1, -0, +0, +1}: k = 70 splits the ~95 zeros whatever the direction.
    signs = torch.where(torch.rand(3, 45) < 0.5, -1.0, 1.0)
    values = signs * 0.0
    ones = torch.rand(3, 45) < 0.3
    values[ones] = signs[ones]
    assert (torch.signbit(values) & (values == 0)).any() and (~torch.signbit(values) & (values == 0)).any()
    mixed = [values.to(dtype).to(triton_device)]
    for k in (20, 70):
        check(mixed, [0], [k], True)
        check(mixed, [0], [k], False)


@LARGEST
@DTYPES
def test_infinities(triton_device, dtype, largest):
    inf = float("inf")
    base = torch.randn(2, 70)
    pick = torch.rand(2, 70)
    base[pick < 0.15] = inf
    base[pick > 0.85] = -inf
    scores = [base.to(dtype).to(triton_device), torch.tensor([inf, -inf, 1.0, -inf], dtype=dtype, device=triton_device)]
    n_pos, n_neg = int((pick < 0.15).sum()) + 1, int((pick > 0.85).sum()) + 2
    n = 144
    for k in (n_pos - 3, n - n_neg + 1):  # each threshold splits the ties at one infinity
        check(scores, [0, 0], [k], largest)


@pytest.mark.parametrize("where", ["trivial-k0", "trivial-kn", "selecting"])
@DTYPES
def test_nan_raises(triton_device, dtype, where):
    scores = [torch.randn(s).to(dtype).to(triton_device) for s in [(3, 40), (70,), (5, 9), (11,)]]
    scores[2].view(-1)[17] = float("nan")
    scores[3][4] = float("nan")
    group = [0, 1, 1, 0]
    ks = {"trivial-k0": [5, 0], "trivial-kn": [5, 115], "selecting": [5, 60]}[where]
    with pytest.raises(ValueError, match=r"^scores\[2\]: contains NaN"):
        topk_mask_fwd(scores, group, ks, True)


def test_empty_and_single_element(triton_device):
    shapes = [(0,), (1,), (0, 5), (5, 0), (), (1, 1), (33,), (4, 0, 3)]
    scores = [torch.randn(s, device=triton_device) for s in shapes]
    out = check(scores, [0, 1, 1, 2, 0, 1, 0, 2], [2, 1, 0], True)
    # (0, 5) packs to (0, 1), the packed shape of its own shape (unpack_mask(mask, (0, 5)) needs it)
    assert [tuple(o.shape) for o in out] == [(1, 0), (1, 1), (0, 1), (5, 0), (1, 1), (1, 1), (1, 2), (4, 0)]
    check(scores, [0, 1, 1, 2, 0, 1, 0, 2], [34, 2, 0], False)
    check([torch.tensor([3.0], device=triton_device)], [0], [1], True)


def test_many_tensors_one_group_each(triton_device):
    sizes = torch.randint(1, 30, (40,)).tolist()
    shapes = [[(r,), (r, 3), (2, r, 2)][i % 3] for i, r in enumerate(sizes)]
    scores = distinct_scores(shapes, fp32, triton_device)
    ks = [int(torch.randint(0, s.numel() + 1, ())) for s in scores]
    check(scores, list(range(40)), ks, True)


class _Spy:
    """Records whether each pass found each group's threshold bin inside its key range."""

    def __init__(self, monkeypatch):
        self.hits = []
        locate = kernel._locate

        def spy(hist, above, k):
            result = locate(hist, above, k)
            self.hits.append(result[3].tolist())
            return result
        monkeypatch.setattr(kernel, "_locate", spy)


@DTYPES
def test_sampled_bracket_and_repair(triton_device, dtype, monkeypatch):
    """Large-group path on small tensors: every group samples 1/4 of its scores. A benign input
    resolves inside the sampled bracket; an input whose sampled positions hold the largest scores
    makes the bracket miss, and the repair pass must recover the exact threshold."""
    monkeypatch.setattr(kernel, "_SAMPLE_MIN_NUMEL", 0)
    monkeypatch.setattr(kernel, "_SAMPLE_RATE", 4)
    spy = _Spy(monkeypatch)
    shapes = [(21, 37), (257,), (3, 4, 5)]
    scores = distinct_scores(shapes, dtype, triton_device)
    check(scores, [0, 1, 0], [400, 100], True)
    assert spy.hits[0] == [True, True]

    spy.hits.clear()
    trap = torch.rand(40, 50) / 4
    hashed = (torch.arange(trap.numel() // 4) * kernel._SAMPLE_MULT) % trap.numel()
    trap.view(-1)[hashed] = 512 + torch.rand(hashed.numel()) * 64
    scores = [trap.to(dtype).to(triton_device), scores[1]]
    check(scores, [0, 1], [1000, 100], True)
    assert spy.hits[0] == [False, True], "the sampled bracket was expected to miss for group 0"


def test_input_errors(triton_device):
    a = torch.randn(4, 5, device=triton_device)
    with pytest.raises(ValueError, match=r"scores\[1\]: expected dtype torch.float32"):
        topk_mask_fwd([a, a.half()], [0, 0], [3], True)
    with pytest.raises(ValueError, match=r"scores\[0\]: expected dtype float32, float16 or bfloat16"):
        topk_mask_fwd([a.double()], [0], [3], True)
    with pytest.raises(ValueError, match=r"scores\[0\]: expected a contiguous tensor"):
        topk_mask_fwd([a.T], [0], [3], True)
    with pytest.raises(ValueError, match=r"ks\[0\]: expected an int in \[0, 20\]"):
        topk_mask_fwd([a], [0], [21], True)
    with pytest.raises(ValueError, match=r"group: expected ints in \[0, 1\)"):
        topk_mask_fwd([a], [1], [3], True)
    with pytest.raises(ValueError, match=r"group: expected one group index per score tensor"):
        topk_mask_fwd([a, a], [0], [3], True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [bf16, fp16, fp32], ids=NAMES.get)
@LARGEST
def test_gpu_large_and_bf16(dtype, largest):
    """Sizes where the default sampling (groups of >= 2**20 scores) and 1024-score chunks apply."""
    shapes = [(1024, 1031), (3, 64, 3, 3), (777_777,), (1, 1)]
    scores = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    ties = [torch.randint(0, 3, s, device="cuda").to(dtype) for s in shapes]
    n = sum(s.numel() for s in scores)
    for k in (1, n // 10, n // 2, n - 1):
        check(scores, [0, 0, 0, 0], [k], largest)
    check(scores, [0, 1, 1, 0], [n // 3, 1000], largest)
    check(ties, [0, 0, 0, 0], [n // 2], largest)



@pytest.mark.gpu
def test_gpu_side_stream_and_other_device():
    """Launches on the scores' device and current stream: on a side stream (the table copies and
    the kernels must be ordered on it) and, with two GPUs, with scores on a device other than the
    current one."""
    shapes = [(1024, 1031), (777_777,)]
    scores = [torch.randn(s, device="cuda:0") for s in shapes]
    n = sum(s.numel() for s in scores)
    stream = torch.cuda.Stream("cuda:0")
    stream.wait_stream(torch.cuda.current_stream("cuda:0"))
    with torch.cuda.stream(stream):
        check(scores, [0, 0], [n // 3], True)
    if torch.cuda.device_count() > 1:
        other = [s.to("cuda:1") for s in scores]
        with torch.cuda.device(0):
            out = check(other, [0, 0], [n // 3], True)
        assert all(o.device == torch.device("cuda:1") for o in out)
