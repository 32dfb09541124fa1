"""sparse_engine::topk_mask through the op layer: the public wrapper's forms of k, the reference,
opcheck, compile and errors. Kernel-level cases (ties, sizes, dtypes) are in
test_topk_mask_kernels.py (C++) and test_topk_mask_triton.py (Triton)."""
import pytest
import torch

from sparse_engine.ops import unpack_mask
from sparse_engine.ops.mask_pack import packed_shape
from sparse_engine.ops.topk_mask import selection_shape, topk_mask, topk_mask_ref


def layers(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 97), (131,), (3, 5, 2, 2), (1, 1), (0, 4), (257, 33)]
    return [torch.randn(s, generator=g) for s in shapes]


def bool_masks(packed, scores):
    return [unpack_mask(p, selection_shape(s.shape)).reshape(s.shape) for p, s in zip(packed, scores)]


@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("k", [0, 1, 500, 9351, 9352], ids=lambda k: f"k{k}")
def test_global_k_matches_reference_and_orders(k, largest):
    scores = layers()
    n = sum(s.numel() for s in scores)
    assert n == 9352
    packed = topk_mask(scores, k, largest)
    assert all(torch.equal(a, b) for a, b in zip(packed, topk_mask_ref(scores, [0] * len(scores), [k], largest)))
    masks = bool_masks(packed, scores)
    assert sum(int(m.sum()) for m in masks) == k
    kept = torch.cat([s[m] for s, m in zip(scores, masks)])
    dropped = torch.cat([s[~m] for s, m in zip(scores, masks)])
    if kept.numel() and dropped.numel():
        if largest:
            assert kept.min() >= dropped.max()
        else:
            assert kept.max() <= dropped.min()


def test_per_tensor_k_and_groups():
    scores = layers(1)
    ks = [s.numel() // 3 for s in scores]
    masks = bool_masks(topk_mask(scores, ks), scores)
    assert [int(m.sum()) for m in masks] == ks
    group = [0, 1, 0, 1, 0, 1]
    packed = topk_mask(scores, [100, 50], group=group)
    ref = topk_mask_ref(scores, group, [100, 50], True)
    assert all(torch.equal(a, b) for a, b in zip(packed, ref))
    masks = bool_masks(packed, scores)
    assert sum(int(m.sum()) for m, g in zip(masks, group) if g == 0) == 100


def test_matches_torch_topk_on_tie_free_scores():
    scores = [torch.randn(40, 50), torch.randn(333)]
    k = 777
    flat = torch.cat([s.flatten() for s in scores])
    ref = torch.zeros_like(flat, dtype=torch.bool)
    ref[flat.topk(k).indices] = True
    masks = bool_masks(topk_mask(scores, k), scores)
    assert torch.equal(torch.cat([m.flatten() for m in masks]), ref)


def test_ties_follow_tensor_then_index_order():
    scores = [torch.ones(2, 3), torch.ones(4)]
    masks = bool_masks(topk_mask(scores, 7), scores)
    assert masks[0].all() and masks[1].tolist() == [True, False, False, False]
    zeros = [torch.tensor([[-0.0, 0.0, -0.0]])]
    assert bool_masks(topk_mask(zeros, 2), zeros)[0].tolist() == [[True, True, False]]


def test_opcheck_and_compile():
    scores = [torch.randn(5, 40), torch.randn(7)]
    torch.library.opcheck(torch.ops.sparse_engine.topk_mask.default, (scores, [0, 0], [20], True, "triton"))
    torch._dynamo.reset()
    fn = torch.compile(lambda a, b: topk_mask([a.abs(), b.abs()], 20), fullgraph=True, backend="aot_eager")
    assert all(torch.equal(x, y) for x, y in zip(fn(*scores), topk_mask([s.abs() for s in scores], 20)))


def test_bad_input():
    a = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"scores\[1\]: expected dtype torch.float32"):
        topk_mask([a, a.half()], 3)
    with pytest.raises(ValueError, match=r"scores\[1\]: expected device cpu"):
        topk_mask([a, a.to("meta")], 3)
    with pytest.raises(TypeError, match=r"scores\[0\]: expected dtype in"):
        topk_mask([a.double()], 3)
    with pytest.raises(ValueError, match=r"k: expected an int in \[0, 32\]"):
        topk_mask([a], 33)
    with pytest.raises(ValueError, match=r"k: expected an int in \[0, 32\]"):
        topk_mask([a], -1)
    with pytest.raises(ValueError, match="k: expected an int or one int per score tensor"):
        topk_mask([a, a], [1, 2, 3])
    with pytest.raises(ValueError, match="group: expected ints in"):
        topk_mask([a, a], [1], group=[0, 1])
    with pytest.raises(ValueError, match="scores: expected a non-empty list"):
        topk_mask([], 0)
    nan = a.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[1\]: contains NaN"):
        topk_mask([a, nan], 3)


# Every rank, 0-d included, and empty tensors whose first dimension is 0.
ANY_RANK = [(), (1,), (10,), (0,), (97,), (0, 5), (3, 0), (7, 33), (2, 0, 3), (4, 3, 5, 7)]


@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_every_mask_unpacks_with_its_tensors_own_shape(largest):
    scores = [torch.randn(s) for s in ANY_RANK]
    n = sum(s.numel() for s in scores)
    for k in (0, 1, n // 2, n):
        packed = topk_mask(scores, k, largest)
        ref = topk_mask_ref(scores, [0] * len(scores), [k], largest)
        masks = []
        for p, r, s in zip(packed, ref, scores):
            assert tuple(p.shape) == packed_shape(s.shape) and torch.equal(p, r)
            mask = unpack_mask(p, s.shape)
            assert mask.shape == s.shape
            masks.append(mask)
        assert sum(int(m.sum()) for m in masks) == k
        kept = torch.cat([s[m].reshape(-1) for s, m in zip(scores, masks)])
        dropped = torch.cat([s[~m].reshape(-1) for s, m in zip(scores, masks)])
        if kept.numel() and dropped.numel():
            assert (kept.min() >= dropped.max()) if largest else (kept.max() <= dropped.min())
    # One 1-D tensor, as in the issue: its mask unpacks with shape (1000,).
    s = torch.randn(1000)
    mask = unpack_mask(topk_mask(s, 300)[0], (1000,))
    assert mask.shape == (1000,) and int(mask.sum()) == 300 and s[mask].min() >= s[~mask].max()


@pytest.mark.parametrize("k, error, match", [
    (3.0, TypeError, r"k: expected an int or a list of ints .*got float 3.0"),
    (None, TypeError, r"k: expected an int or a list of ints .*got NoneType"),
    (torch.tensor(3), TypeError, r"k: expected an int or a list of ints .*got a tensor; pass int\(k\)"),
    (torch.tensor([3]), TypeError, r"k: .*got a tensor"),
    (True, TypeError, r"k: expected an int .*got bool"),
    ("3", TypeError, r"k: expected an int .*got str"),
    ([3.0], TypeError, r"k\[0\]: expected an int, got float"),
    ([False], TypeError, r"k\[0\]: expected an int, got bool"),
], ids=["float", "None", "tensor-0d", "tensor-1d", "bool", "str", "list-float", "list-bool"])
def test_bad_k_names_the_argument(k, error, match):
    with pytest.raises(error, match=match):
        topk_mask(torch.randn(10), k)


def test_bad_group_largest_and_scores_name_the_argument():
    s = torch.randn(10)
    with pytest.raises(ValueError, match=r"group: expected ints in \[0, 1\)"):
        topk_mask([s], 3, group=[False])
    with pytest.raises(TypeError, match="group: expected None or a list of ints"):
        topk_mask([s], 3, group=0)
    with pytest.raises(TypeError, match="largest: expected a bool, got str"):
        topk_mask([s], 3, largest="no")
    with pytest.raises(TypeError, match="scores: expected a tensor or a list of tensors, got int"):
        topk_mask(3, 1)
    # numpy-style integers are ints
    assert int(unpack_mask(topk_mask(s, torch.tensor(4).numpy()[()])[0], s.shape).sum()) == 4
