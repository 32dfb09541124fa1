"""Granularities: N:M along the input dimension, BxB blocks, and their masks through prune_."""
import copy

import pytest
import torch
from torch import nn

from sparse_engine import sparsify
from sparse_engine.pruning import Granularity, check_nm, nm_mask, parse_granularity, prune_
from sparse_engine.pruning.select.granularity import block_norms


def nm_reference(scores, n, m):
    """Per group, a Python sort by (-score, index): the n best, lower index first among ties."""
    flat = scores.reshape(-1, m).tolist()
    keep = torch.zeros(len(flat), m, dtype=torch.bool)
    for g, row in enumerate(flat):
        for i in sorted(range(m), key=lambda i: (-row[i], i))[:n]:
            keep[g, i] = True
    return keep.reshape(scores.shape)


def test_parse():
    assert parse_granularity("unstructured") == Granularity("unstructured")
    assert parse_granularity("2:4") == Granularity("nm", n=2, m=4)
    assert parse_granularity("32x32") == Granularity("block", block=32)
    assert str(parse_granularity("4:8")) == "4:8" and str(parse_granularity("16x16")) == "16x16"
    for bad, match in [("5:4", "1 <= N <= M"), ("16x8", "square"), ("blocks", "expected one of"),
                       (4, "expected one of")]:
        with pytest.raises(ValueError, match=match):
            parse_granularity(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 8)])
def test_nm_mask_keeps_the_n_largest_with_lower_index_ties(n, m):
    scores = torch.randint(0, 4, (7, 3 * m)).float()  # many ties
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, nm_reference(scores, n, m))
    assert check_nm(mask, n, m, exact=True)
    groups, kept = scores.reshape(-1, m), mask.reshape(-1, m)
    kept_min = torch.where(kept, groups, torch.inf).min(1).values
    dropped_max = torch.where(kept, -torch.inf, groups).max(1).values
    assert (kept_min >= dropped_max).all()


def test_nm_mask_signed_zeros_tie_and_conv_columns():
    mask = nm_mask(torch.tensor([[0.0, -0.0, -0.0, 0.0, -1.0, 2.0, 2.0, 2.0]]), 2, 4)
    assert mask.tolist() == [[True, True, False, False, False, True, True, False]]
    w = torch.randn(8, 4, 3, 3)  # columns (ci, kh, kw): 36, groups of 4 consecutive flattened columns
    mask = nm_mask(w.abs(), 2, 4)
    assert mask.shape == w.shape and check_nm(mask, 2, 4, exact=True)
    assert torch.equal(mask, nm_reference(w.abs(), 2, 4))
    with pytest.raises(ValueError, match="not a multiple of m=8"):
        nm_mask(torch.randn(8, 3, 3, 3), 2, 8)  # 27 columns
    with pytest.raises(ValueError, match="contains NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]), 2, 4)


def test_check_nm_detects_violations():
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, [0, 1, 4, 5]] = True
    assert check_nm(mask, 2, 4) and check_nm(mask, 2, 4, exact=True)
    assert not check_nm(mask, 1, 4)
    mask[2, 6] = True
    assert not check_nm(mask, 2, 4)
    mask[2, 6] = False
    mask[1, 0] = False
    assert check_nm(mask, 2, 4) and not check_nm(mask, 2, 4, exact=True)
    with pytest.raises(TypeError, match="bool"):
        check_nm(mask.int(), 2, 4)


def test_2_4_matches_torch_weight_norm_sparsifier():
    from torch.ao.pruning import WeightNormSparsifier
    dense = nn.Sequential(nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 12))
    ref = copy.deepcopy(dense)
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(ref, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    model = sparsify(copy.deepcopy(dense))
    prune_(model, 0.5, granularity="2:4")
    for i in (0, 2):
        expected = ref[i].parametrizations.weight[0].mask.bool()
        assert torch.equal(model[i].mask, expected)
        assert check_nm(model[i].mask, 2, 4, exact=True)


def test_nm_through_prune_conv_and_errors():
    model = sparsify(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="layer '0' has 27 input columns .* not a multiple of M=4; exclude it"):
        prune_(model, 0.75, granularity="1:4")
    with pytest.raises(ValueError, match=r"keeps 1 of every 4 weights \(sparsity 0.75\); got sparsity=0.5"):
        prune_(model, 0.5, granularity="1:4", exclude="0")
    with pytest.raises(ValueError, match="fixes every layer's density"):
        prune_(model, 0.75, allocation="erk", granularity="1:4", exclude="0")
    before = model[0].mask.clone()
    prune_(model, 0.75, granularity="1:4", exclude="0")
    assert torch.equal(model[0].mask, before)
    for i in (1, 3):
        assert check_nm(model[i].mask, 1, 4, exact=True)
        assert torch.equal(model[i].mask, nm_reference(model[i].weight.abs().float(), 1, 4) & model[i].mask)
    # regrow=False: pruning again at 2:4 cannot regrow, groups keep at most their one weight
    prune_(model, 0.5, granularity="2:4", exclude="0")
    assert check_nm(model[1].mask, 1, 4, exact=True)


def test_nm_pruned_weights_rank_last_unless_regrow():
    model = sparsify(nn.Sequential(nn.Linear(8, 6)))
    first = torch.zeros(6, 8, dtype=torch.bool)
    first[:, ::4] = True
    model[0].set_mask(~first)  # the first weight of every group is pruned
    scores = {"0": torch.where(first, 100.0, torch.rand(6, 8))}
    prune_(model, 0.5, scores, granularity="2:4")
    assert check_nm(model[0].mask, 2, 4, exact=True) and not (model[0].mask & first).any()
    prune_(model, 0.5, scores, granularity="2:4", regrow=True)
    assert check_nm(model[0].mask, 2, 4, exact=True) and (model[0].mask & first).sum() == 12


def test_block_norms_and_expand():
    scores = torch.arange(32.0).reshape(4, 8)
    norms = block_norms(scores, 2)
    assert norms.shape == (2, 4)
    assert norms[1, 2].item() == pytest.approx(torch.tensor([20.0, 21, 28, 29]).norm().item())
    g = parse_granularity("2x2")
    unit_mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    mask = g.expand(unit_mask, (4, 2, 2, 2))
    assert mask.shape == (4, 2, 2, 2)
    assert torch.equal(mask.reshape(4, 8)[::2, ::2], unit_mask) and int(mask.sum()) == 12


def test_blocks_through_prune():
    model = sparsify(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)))
    layers = [model[0], model[2], model[4]]
    norms = [block_norms(m.weight.detach().abs().float(), 16) for m in layers]  # 8 + 4 + 2 = 14 blocks
    report = prune_(model, 0.5, granularity="16x16")
    assert report.kept == 7 * 256
    kept = torch.cat([(m.mask.reshape(m.weight.shape[0] // 16, 16, -1, 16).all(3).all(1)).reshape(-1)
                      for m in layers])
    dropped_any = torch.cat([(m.mask.reshape(m.weight.shape[0] // 16, 16, -1, 16).any(3).any(1)).reshape(-1)
                             for m in layers])
    assert torch.equal(kept, dropped_any)  # whole blocks only
    flat = torch.cat([n.reshape(-1) for n in norms])
    assert flat[kept].min() >= flat[~kept].max()
    # per-layer allocation in blocks: uniform at 50% keeps half the blocks of each layer
    model2 = sparsify(copy.deepcopy(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 32))))
    report = prune_(model2, 0.5, allocation="uniform", granularity="16x16")
    assert [layer.kept for layer in report.layers] == [4 * 256, 2 * 256]
    with pytest.raises(ValueError, match=r"layer '0' viewed as \(8, 27\) is not divisible into 16x16 blocks"):
        prune_(sparsify(nn.Sequential(nn.Conv2d(3, 8, 3))), 0.5, granularity="16x16")
