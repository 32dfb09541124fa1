"""Bad arguments to the public functions of sparse_engine.pruning and sparse_engine.ops get an
error that names the argument (NaN, inf, negative numbers, bools as ints, wrong lengths), never a
silent wrong result. topk_mask's own cases are in test_topk_mask.py, pack/unpack's in
test_mask_pack.py, model-level calls' in test_restore_on_error.py (which also checks that they
change nothing)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import masked_conv2d, pack_mask, prune_, sparsify
from sparse_engine.pruning import (OneShot, allocate, erk_densities, fggp_keep_scores, forward_with, grasp_scores,
                                   lamp_transform, layer_densities, magnitude_scores, nm_mask, check_nm,
                                   regrowth_scores, synflow_scores, target_kept)
from sparse_engine.pruning.select.allocation import apportion, fit_densities, global_counts
from sparse_engine.pruning.select.granularity import block_norms

NAN, INF = float("nan"), float("inf")
SHAPES = [(16, 8), (4, 16)]


def mlp():
    return sparsify(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))


# (call, exception, message) -- the reproducers of issue 11, items 10 and 11, first.
CASES = {
    "prune-exclude-int": (lambda: prune_(mlp(), 0.7, exclude=3), TypeError, r"exclude: expected None, a name pattern"),
    "oneshot-exclude-int": (lambda: OneShot(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1), 0.7, exclude=3),
                            TypeError, r"exclude: expected None"),
    "erk-empty-layer": (lambda: erk_densities([(0, 4)], 0.5), ValueError,
                        r"shapes\[0\]: ERK's density .* needs every dimension >= 1, got shape \(0, 4\)"),
    "erk-nan": (lambda: erk_densities(SHAPES, NAN), ValueError, r"density: expected a density in \[0, 1\], got nan"),
    "erk-inf": (lambda: erk_densities(SHAPES, INF), ValueError, r"density: expected a density in \[0, 1\], got inf"),
    "erk-above-1": (lambda: erk_densities(SHAPES, 1.5), ValueError, r"density: expected a density"),
    "erk-bool": (lambda: erk_densities(SHAPES, True), TypeError, r"density: expected a density"),
    "erk-min-density-nan": (lambda: erk_densities(SHAPES, 0.5, NAN), ValueError, r"min_density: expected a density"),
    "layer-densities-erk-nan": (lambda: layer_densities("erk", SHAPES, NAN), ValueError, r"density: expected"),
    "layer-densities-uniform-nan": (lambda: layer_densities("uniform", SHAPES, NAN), ValueError,
                                    r"density: expected"),
    "layer-densities-numels-length": (lambda: layer_densities("uniform", SHAPES, 0.5, numels=[1]), ValueError,
                                      r"numels: expected one entry per layer \(2\), got 1"),
    "layer-densities-shape-negative": (lambda: layer_densities("uniform", [(4, -1)], 0.5), ValueError,
                                       r"shapes\[0\]: expected a shape of ints >= 0"),
    "allocate-two-names-one-shape": (lambda: allocate("uniform", ["a", "b"], [(4, 4)], 0.5), ValueError,
                                     r"shapes: expected one entry per layer name \(2\), got 1"),
    "allocate-sparsity-nan": (lambda: allocate("global", ["a"], [(4, 4)], NAN), ValueError,
                              r"sparsity: expected a sparsity in \[0, 1\), got nan"),
    "allocate-numels-length": (lambda: allocate("uniform", ["a"], [(4, 4)], 0.5, numels=[1, 2]), ValueError,
                               r"numels: expected one entry per layer \(1\), got 2"),
    "allocate-min-density-nan": (lambda: allocate("uniform", ["a"], [(4, 4)], 0.5, min_density=NAN), ValueError,
                                 r"min_density: expected a density"),
    "allocate-duplicate-names": (lambda: allocate("uniform", ["a", "a"], SHAPES, 0.5), ValueError,
                                 r"names: expected distinct layer names"),
    "allocate-erk-empty-layer": (lambda: allocate("erk", ["a", "b"], [(4, 4), (0, 3)], 0.5), ValueError,
                                 r"allocation 'erk': layer 'b': ERK's density"),
    "allocate-scores-length": (lambda: allocate("global", ["a", "b"], SHAPES, 0.5, min_density=0.1,
                                                scores=[torch.rand(16, 8)]), ValueError,
                               r"scores: expected one entry per layer \(2\), got 1"),
    "target-kept-negative": (lambda: target_kept(-1, 0.5), ValueError, r"n: expected an int >= 0, got -1"),
    "target-kept-bool": (lambda: target_kept(True, 0.5), TypeError, r"n: expected an int >= 0, got True"),
    "target-kept-nan": (lambda: target_kept(10, NAN), ValueError, r"sparsity: expected a sparsity in \[0, 1\]"),
    "target-kept-above-1": (lambda: target_kept(10, 2.0), ValueError, r"sparsity: expected a sparsity"),
    "fit-densities-length": (lambda: fit_densities([4, 4], [1.0], 2, [0, 0], [1, 1]), ValueError,
                             r"raw: expected one entry per layer \(2\), got 1"),
    "fit-densities-kept-nan": (lambda: fit_densities([4], [1.0], NAN, [0], [1]), ValueError,
                               r"kept: expected a finite number"),
    "apportion-nan": (lambda: apportion([NAN, 1.0], 2, [0, 0], [4, 4]), ValueError, r"targets: expected finite"),
    "apportion-length": (lambda: apportion([1.0, 1.0], 2, [0], [4, 4]), ValueError, r"lo: expected one entry"),
    "global-counts-length": (lambda: global_counts([torch.rand(4), torch.rand(4)], 3, [1]), ValueError,
                             r"floors: expected one entry per score tensor \(2\), got 1"),
    # granularity
    "nm-mask-bool": (lambda: nm_mask(torch.rand(4, 8), True, 4), TypeError, r"n: expected an int >= 1, got True"),
    "nm-mask-n-above-m": (lambda: nm_mask(torch.rand(4, 8), 3, 2), ValueError, r"n, m: expected 1 <= n <= m"),
    "check-nm-m-zero": (lambda: check_nm(torch.rand(4, 8) > 0.5, 2, 0), ValueError, r"m: expected an int >= 1"),
    "block-norms-zero": (lambda: block_norms(torch.rand(4, 8), 0), ValueError, r"block: expected an int >= 1"),
    "block-norms-nan": (lambda: block_norms(torch.rand(4, 8), NAN), TypeError, r"block: expected an int >= 1"),
    # scores
    "grasp-temperature-zero": (lambda: grasp_scores(mlp(), F.cross_entropy, (torch.randn(4, 8),
                                                                             torch.randint(0, 4, (4,))), temperature=0),
                               ValueError, r"temperature: expected a finite number > 0"),
    "grasp-temperature-nan": (lambda: grasp_scores(mlp(), F.cross_entropy, (torch.randn(4, 8),
                                                                            torch.randint(0, 4, (4,))),
                                                   temperature=NAN), ValueError, r"temperature: expected"),
    "synflow-input-shape-zero": (lambda: synflow_scores(mlp(), (0, 8)), ValueError,
                                 r"input_shape: expected a non-empty sequence of ints >= 1"),
    "synflow-input-shape-bool": (lambda: synflow_scores(mlp(), (True, 8)), ValueError, r"input_shape: expected"),
    "synflow-input-shape-inf": (lambda: synflow_scores(mlp(), (INF, 8)), ValueError, r"input_shape: expected"),
    "lamp-nan": (lambda: lamp_transform(torch.tensor([NAN, 1.0])), ValueError, r"values: contains NaN or inf"),
    "scores-names-str": (lambda: magnitude_scores(mlp(), names="0"), TypeError, r"names: expected None or a list"),
    "regrowth-names-str": (lambda: regrowth_scores(mlp(), torch.optim.SGD(mlp().parameters(), lr=0.1),
                                                   F.cross_entropy, (torch.randn(4, 8), torch.randint(0, 4, (4,))),
                                                   names="0"), TypeError, r"names: expected None or a list"),
    "fggp-lengths": (lambda: fggp_keep_scores([torch.rand(4, 8)] * 2, [torch.rand(4, 8)], [torch.ones(4, 8) > 0],
                                              [3], [0], 2.0), ValueError, r"grads: expected one entry per weight"),
    "fggp-group-bool": (lambda: fggp_keep_scores([torch.rand(4, 8)], [torch.rand(4, 8)], [torch.ones(4, 8) > 0],
                                                 [3], [True], 2.0), ValueError, r"group: expected ints"),
    # ops
    "conv-groups-bool": (lambda: masked_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3),
                                               pack_mask(torch.ones(2, 2, 3, 3, dtype=torch.bool)), groups=True),
                         ValueError, r"groups: expected a positive int"),
    "conv-stride-bool": (lambda: masked_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3),
                                               pack_mask(torch.ones(2, 2, 3, 3, dtype=torch.bool)), stride=True),
                         ValueError, r"stride: expected an int or a pair of ints"),
    "conv-stride-float": (lambda: masked_conv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3),
                                                pack_mask(torch.ones(2, 2, 3, 3, dtype=torch.bool)), stride=1.5),
                          ValueError, r"stride: expected an int or a pair of ints"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_argument_is_named(case):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match):
        call()


def test_forward_with_needs_one_weight_per_layer():
    m = mlp()
    with pytest.raises(ValueError, match=r"weights: expected one tensor per layer \(2\), got 1"):
        with forward_with([m[0], m[2]], [m[0].weight]):
            pass
    assert "forward" not in vars(m[0]) and "forward" not in vars(m[2])


def test_good_arguments_still_work():
    """The checks accept what they should: numpy numbers, exact bounds, empty layers where allowed."""
    import numpy as np
    assert target_kept(np.int64(10), np.float64(0.5)) == 5 and target_kept(0, 1.0) == 0
    assert erk_densities([(4, 4)], 1.0) == [1.0]
    assert layer_densities("uniform", [(0, 4), (4, 4)], 0.5)[1] == pytest.approx(0.5)
    assert allocate("uniform", ("a", "b"), [[16, 8], [4, 16]], 0.5, min_density=0).ks == [64, 32]
    assert nm_mask(torch.rand(4, 8), np.int64(2), 4).sum() == 16
