"""prune_: masks chosen by score x allocation x granularity, torch compatibility, regrowth, errors."""
import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from sparse_engine import sparse_modules, sparsify
from sparse_engine.pruning import (allocate, global_magnitude_prune_, gradient_scores, grasp_scores, lamp_scores,
                                   magnitude_scores, prune_, random_scores, saliency_scores, synflow_scores,
                                   target_kept, wanda_scores)

prune_module = importlib.import_module("sparse_engine.pruning.select.prune")


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 5))


def data(shape, n=6):
    return torch.randn(n, *shape), torch.randint(0, 5, (n,))


def masks(model):
    return {n: m.mask for n, m in sparse_modules(model)}


def assert_threshold(model, scores, names=None):
    """Exactly the best-scored weights are kept: kept.min() >= dropped.max() over the layers."""
    layers = dict(sparse_modules(model))
    names = list(scores) if names is None else names
    s = torch.cat([scores[n].reshape(-1) for n in names])
    k = torch.cat([layers[n].mask.reshape(-1) for n in names])
    if k.any() and not k.all():
        assert s[k].min() >= s[~k].max()


@pytest.fixture
def rounds(monkeypatch):
    """Records the sparsity of every pruning round and checks that rounds only prune."""
    seen = []
    original = prune_module._prune_round

    def spy(model, layers, sparsity, *args):
        seen.append(sparsity)
        before = masks(model)
        original(model, layers, sparsity, *args)
        assert all((m & ~before[n]).sum() == 0 for n, m in masks(model).items())

    monkeypatch.setattr(prune_module, "_prune_round", spy)
    return seen


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97])
def test_global_magnitude_matches_torch_global_unstructured(make, sparsity):
    dense = make()
    ref = copy.deepcopy(dense)
    params = [(m, "weight") for m in ref.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    model = sparsify(copy.deepcopy(dense))
    report = prune_(model, sparsity)
    for (_, layer), (m, _) in zip(sparse_modules(model), params):
        assert torch.equal(layer.mask, m.weight_mask.bool())
        assert torch.equal(layer.weight, m.weight)  # the pruned weights are zero in both
    assert report.kept == target_kept(sum(m.weight.numel() for m, _ in params), sparsity)
    legacy = sparsify(copy.deepcopy(dense))
    global_magnitude_prune_(legacy, sparsity)
    assert all(torch.equal(a, b) for a, b in zip(masks(legacy).values(), masks(model).values()))


SCORE_CASES = {
    # name: (prune_ inputs, the same scores from the score function)
    "magnitude": (lambda x, y: {}, lambda m, x, y: magnitude_scores(m)),
    "gradient": (lambda x, y: dict(loss_fn=F.cross_entropy, data=(x, y)),
                 lambda m, x, y: gradient_scores(m, F.cross_entropy, (x, y))),
    "saliency": (lambda x, y: dict(loss_fn=F.cross_entropy, data=[(x, y)]),
                 lambda m, x, y: saliency_scores(m, F.cross_entropy, (x, y))),
    "grasp": (lambda x, y: dict(loss_fn=F.cross_entropy, data=(x, y)),
              lambda m, x, y: grasp_scores(m, F.cross_entropy, (x, y))),
    "synflow": (lambda x, y: dict(input_shape=(1, 3, 7, 7), iterations=1),
                lambda m, x, y: synflow_scores(m, (1, 3, 7, 7))),
    "wanda": (lambda x, y: dict(calib_data=x), lambda m, x, y: wanda_scores(m, x)),
    "lamp": (lambda x, y: {}, lambda m, x, y: lamp_scores(m)),
    "random": (lambda x, y: dict(generator=torch.Generator().manual_seed(0)),
               lambda m, x, y: random_scores(m, torch.Generator().manual_seed(0))),
}


@pytest.mark.parametrize("score", list(SCORE_CASES))
def test_every_score_keeps_its_best_weights(score):
    x, y = data((3, 7, 7))
    base = sparsify(cnn()).train()
    inputs, scores_of = SCORE_CASES[score]
    scores = scores_of(base, x, y)
    model = copy.deepcopy(base)
    report = prune_(model, 0.6, score, **inputs(x, y))
    assert report.kept == target_kept(report.numel, 0.6)
    assert_threshold(model, scores)
    model = copy.deepcopy(base)
    report = prune_(model, 0.6, score, "erk", **inputs(x, y))
    counts = allocate("erk", [la.name for la in report.layers], [la.shape for la in report.layers], 0.6).ks
    assert [layer.kept for layer in report.layers] == counts
    for name in scores:
        assert_threshold(model, scores, [name])


def test_lamp_score_equals_lamp_allocation_of_magnitude():
    a = sparsify(mlp())
    b = copy.deepcopy(a)
    prune_(a, 0.93, "lamp")
    prune_(b, 0.93, "magnitude", "lamp")
    assert all(torch.equal(x, y) for x, y in zip(masks(a).values(), masks(b).values()))


def test_min_density_and_custom_scores():
    model = sparsify(mlp())
    # Custom scores that rank '5' above '1' above '3': the floor still keeps 10% of '3'.
    offsets = {"1": 0.0, "3": -10.0, "5": 10.0}
    scores = {n: torch.rand(m.weight.shape) + offsets[n] for n, m in sparse_modules(model)}
    report = prune_(model, 0.8, scores, min_density=0.1)
    assert report.kept == target_kept(report.numel, 0.8) == 600
    assert [layer.kept for layer in report.layers] == [600 - 96 - 120, 96, 120]  # '3' held at ceil(0.1 * 960)
    for name in scores:
        assert_threshold(model, scores, [name])


def test_regrow_false_keeps_pruned_weights_pruned():
    model = sparsify(mlp())
    prune_(model, 0.5)
    first = masks(model)
    x, y = data((48,))
    prune_(model, 0.7, "gradient", loss_fn=F.cross_entropy, data=(x, y))
    second = masks(model)
    assert all((second[n] & ~first[n]).sum() == 0 for n in first)
    assert sum(int(m.sum()) for m in second.values()) == 900
    with pytest.raises(ValueError, match="keeps 1500 weights of the layers but only 900 are unpruned; with "
                                         "regrow=False pruned weights stay pruned"):
        prune_(model, 0.5)
    model = sparsify(mlp())
    model[3].set_mask(torch.rand(24, 40) < 0.1)
    with pytest.raises(ValueError, match="keeps 480 weights of layer '3' but only .* are unpruned"):
        prune_(model, 0.5, allocation="uniform")


def test_regrow_true():
    model = sparsify(mlp())
    prune_(model, 0.5)
    first = masks(model)
    # Magnitude cannot regrow: pruned weights are exact zeros.
    prune_(model, 0.5, regrow=True)
    assert all(torch.equal(first[n], m) for n, m in masks(model).items())
    # Dense gradients can: the new mask is the top-|g| set over all weights.
    x, y = data((48,))
    scores = gradient_scores(model, F.cross_entropy, (x, y))
    prune_(model, 0.5, "gradient", regrow=True, loss_fn=F.cross_entropy, data=(x, y))
    assert_threshold(model, scores)
    assert sum(int((m & ~first[n]).sum()) for n, m in masks(model).items()) > 0
    with pytest.raises(ValueError, match="fggp.*regrow=True is not supported"):
        prune_(model, 0.6, "fggp", regrow=True, rate=2.0, loss_fn=F.cross_entropy, data=(x, y))


def test_exclude_leaves_layers_as_they_are():
    model = sparsify(mlp())
    model[5].set_mask(torch.rand(5, 24) < 0.3)
    before = model[5].mask
    report = prune_(model, 0.75, exclude=["5"])
    assert torch.equal(model[5].mask, before)
    assert report.layers[0].kept + report.layers[1].kept == target_kept(48 * 40 + 40 * 24, 0.75)
    # uniform+ over the two pruned layers: the first stays dense, the last keeps the rest (>= 20%).
    report = prune_(sparsify(mlp()), 0.2, "magnitude", "uniform+", exclude=lambda name, m: name == "5")
    assert [layer.kept for layer in report.layers[:2]] == [48 * 40, target_kept(2880, 0.2) - 48 * 40]


def test_synflow_iterative(rounds):
    model = sparsify(cnn()).train()
    weights = {n: m.weight.detach().clone() for n, m in sparse_modules(model)}
    report = prune_(model, 0.99, "synflow", input_shape=(1, 3, 7, 7), iterations=8)
    assert rounds == pytest.approx([1 - 0.01 ** (t / 8) for t in range(1, 9)])  # exponential schedule
    assert rounds[-1] == 0.99
    assert report.kept == target_kept(report.numel, 0.99)
    assert all(m.training for m in model.modules())
    for n, m in sparse_modules(model):  # kept weights keep their values and signs
        assert torch.equal(m.weight[m.mask], weights[n][m.mask])
    # Continuing from 99%: the schedule starts at the current density.
    rounds.clear()
    prune_(model, 0.995, "synflow", input_shape=(1, 3, 7, 7), iterations=2)
    d0 = report.density
    assert rounds == pytest.approx([1 - d0 * (0.005 / d0) ** 0.5, 0.995])


def test_synflow_default_iterations_differ_from_one_shot(rounds):
    torch.manual_seed(1)
    dense = sparsify(mlp())
    iterative, one_shot = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_(iterative, 0.95, "synflow", input_shape=(1, 48))
    assert len(rounds) == 100
    prune_(one_shot, 0.95, "synflow", input_shape=(1, 48), iterations=1)
    assert any(not torch.equal(a, b) for a, b in zip(masks(iterative).values(), masks(one_shot).values()))


def test_fggp_through_prune():
    model = sparsify(nn.Sequential(nn.Linear(4, 2, bias=False)))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.4], [-0.5, 0.6, 0.7, -0.8]]))
    model[0].weight.grad = torch.tensor([[0.9, -0.3, 0.4, 0.8], [0.7, 0.1, -0.2, 0.6]])
    # Candidates: the 4 lowest |g|; pruned: their 2 lowest |w| (magnitude alone would prune 0.1 and 0.2).
    prune_(model, 0.25, "fggp", rate=2.0)
    assert model[0].mask.tolist() == [[True, False, False, True], [True, True, True, True]]
    prune_(model, 0.5, "fggp", rate=2.0)
    assert model[0].mask.tolist() == [[True, False, False, True], [False, False, True, True]]
    x, y = data((48,))
    report = prune_(sparsify(mlp()), 0.7, "fggp", "erk", rate=1.5, loss_fn=F.cross_entropy, data=(x, y))
    assert report.kept == target_kept(report.numel, 0.7)
    with pytest.raises(ValueError, match="granularity must be 'unstructured'"):
        prune_(sparsify(mlp()), 0.5, "fggp", granularity="2:4", rate=2.0, loss_fn=F.cross_entropy, data=(x, y))


def test_errors():
    model = sparsify(mlp())
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match=r"sparsity: expected a number in \[0, 1\)"):
            prune_(model, bad)
    with pytest.raises(ValueError, match=r"score: expected one of \('magnitude', 'gradient'.*'fggp'\)"):
        prune_(model, 0.5, "taylor")
    with pytest.raises(ValueError, match=r"allocation: expected one of \('global', 'uniform', 'uniform\+', 'erk'"):
        prune_(model, 0.5, allocation="er")
    with pytest.raises(ValueError, match="granularity: expected one of .*unstructured.*N:M.*BxB"):
        prune_(model, 0.5, granularity="channel")
    with pytest.raises(ValueError, match="model: expected a model with sparse layers"):
        prune_(mlp(), 0.5)
    with pytest.raises(ValueError, match="exclude: every sparse layer is excluded"):
        prune_(model, 0.5, exclude="*")
    with pytest.raises(ValueError, match=r"score 'wanda' needs input\(s\) \['calib_data'\]"):
        prune_(model, 0.5, "wanda")
    with pytest.raises(ValueError, match=r"score 'synflow' needs input\(s\) \['input_shape'\]"):
        prune_(model, 0.5, "synflow")
    with pytest.raises(ValueError, match=r"score 'fggp' needs input\(s\) \['rate'\]"):
        prune_(model, 0.5, "fggp")
    with pytest.raises(ValueError, match=r"score 'grasp' needs input\(s\) \['loss_fn', 'data'\]"):
        prune_(model, 0.5, "grasp")
    with pytest.raises(ValueError, match="score 'gradient' needs loss_fn and data"):
        prune_(model, 0.5, "gradient")  # and there is no .grad either
    with pytest.raises(ValueError, match=r"score 'magnitude' does not use input\(s\) \['calib_data'\]"):
        prune_(model, 0.5, calib_data=torch.randn(2, 48))
    with pytest.raises(TypeError, match=r"unexpected input\(s\) \['dataset'\]"):
        prune_(model, 0.5, dataset=None)
    with pytest.raises(ValueError, match="iterations: expected an int >= 1"):
        prune_(model, 0.5, "synflow", input_shape=(1, 48), iterations=0)
    with pytest.raises(ValueError, match=r"min_density: expected None or a number in \[0, 1\]"):
        prune_(model, 0.5, min_density=2)
    with pytest.raises(TypeError, match="regrow: expected a bool"):
        prune_(model, 0.5, regrow=1)
    nan = {n: torch.full(m.weight.shape, float("nan")) for n, m in sparse_modules(model)}
    with pytest.raises(ValueError, match=r"score\['1'\]: contains NaN"):
        prune_(model, 0.5, nan)
    x, y = data((48,))
    with pytest.raises(ValueError, match="scores of layer '1' contain NaN"):  # found by topk_mask itself
        prune_(model, 0.5, "saliency", loss_fn=lambda out, t: out.sum() * float("nan"), data=(x, y))
    assert all(m.all() for m in masks(model).values())  # no failed call pruned anything
