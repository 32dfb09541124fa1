"""Layer-wise allocation: kept counts per layer for a global sparsity (formulas checked by hand)."""
import math

import pytest
import torch
from torch import nn

from sparse_engine import sparsify, sparsity_report
from sparse_engine.pruning import allocate, erk_densities, lamp_transform, layer_densities, prune_, target_kept
from sparse_engine.pruning.select.allocation import apportion, fit_densities

# A small CNN's weight shapes: conv 3->16, conv 16->32, linear 512->64, linear 64->10.
SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 512), (10, 64)]
NAMES = ["conv1", "conv2", "fc1", "fc2"]
NUMELS = [math.prod(s) for s in SHAPES]  # 432, 4608, 32768, 640: 38448 in all


def rigl_erk(shapes, density):
    """RigL's sparse_utils.get_sparsities_erdos_renyi loop (erk_power_scale=1), transcribed."""
    dense = set()
    while True:
        divisor = rhs = 0.0
        raw = {}
        for i, s in enumerate(shapes):
            n = math.prod(s)
            if i in dense:
                rhs -= n * (1 - density)
            else:
                rhs += n * density
                raw[i] = sum(s) / n
                divisor += raw[i] * n
        eps = rhs / divisor
        top = max(raw.values())
        if top * eps > 1:
            dense |= {i for i, r in raw.items() if r == top}
        else:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


def check_counts(counts, densities, kept):
    assert sum(counts) == kept
    for c, d, n in zip(counts, densities, NUMELS):
        assert math.floor(d * n - 1e-9) <= c <= math.ceil(d * n + 1e-9)


@pytest.mark.parametrize("n,s,kept", [(10, 0.25, 8), (5, 0.5, 3), (7, 0.5, 3), (38448, 0.9, 3845), (100, 0.0, 100)])
def test_target_kept_rounds_like_torch_prune(n, s, kept):
    from torch.nn.utils.prune import _compute_nparams_toprune
    assert target_kept(n, s) == kept == n - _compute_nparams_toprune(s, n)


def test_uniform():
    s = 0.73
    kept = target_kept(sum(NUMELS), s)
    counts = allocate("uniform", NAMES, SHAPES, s).ks
    check_counts(counts, [kept / sum(NUMELS)] * 4, kept)
    assert layer_densities("uniform", SHAPES, 0.27) == pytest.approx([0.27] * 4)


@pytest.mark.parametrize("s", [0.5, 0.9])
def test_uniform_plus_matches_formula(s):
    n, kept = sum(NUMELS), target_kept(sum(NUMELS), s)
    first, last, mid = NUMELS[0], NUMELS[-1], NUMELS[1] + NUMELS[2]
    x = (kept - first) / (n - first)
    if x < 0.2:  # s = 0.9: the last layer is held at 20%
        x = (kept - first - 0.2 * last) / mid
    expected = [1.0, x, x, max(0.2, x)]
    assert (x >= 0.2) == (s == 0.5)
    assert layer_densities("uniform+", SHAPES, kept / n) == pytest.approx(expected, rel=1e-12)
    counts = allocate("uniform+", NAMES, SHAPES, s).ks
    check_counts(counts, expected, kept)
    assert counts[0] == NUMELS[0] and counts[-1] >= math.ceil(0.2 * NUMELS[-1] - 1e-9)


def test_uniform_plus_infeasible_is_an_error():
    with pytest.raises(ValueError, match="uniform\\+ keeps the first layer dense"):
        allocate("uniform+", NAMES, SHAPES, 0.995)


@pytest.mark.parametrize("density", [0.02, 0.1, 0.5])
def test_erk_matches_rigl(density):
    ours = erk_densities(SHAPES, density)
    assert ours == pytest.approx(rigl_erk(SHAPES, density), rel=1e-12)
    raw = [sum(s) / math.prod(s) for s in SHAPES]
    free = [i for i, d in enumerate(ours) if d < 1]
    eps = ours[free[0]] / raw[free[0]]
    assert all(ours[i] == pytest.approx(eps * raw[i]) for i in free)
    assert sum(d * n for d, n in zip(ours, NUMELS)) == pytest.approx(density * sum(NUMELS))
    if density == 0.5:
        assert ours[0] == 1.0 and ours[3] == 1.0  # the smallest layers saturate and their excess is redistributed
    s = 1 - density
    kept = target_kept(sum(NUMELS), s)
    check_counts(allocate("erk", NAMES, SHAPES, s).ks, layer_densities("erk", SHAPES, kept / sum(NUMELS)), kept)


def test_min_density_floor_redistributes():
    s, floor = 0.9, 0.07
    plain = erk_densities(SHAPES, 1 - s)
    assert plain[1] < floor  # conv2 would fall below the floor
    counts = allocate("erk", NAMES, SHAPES, s, min_density=floor).ks
    kept = target_kept(sum(NUMELS), s)
    assert sum(counts) == kept
    assert all(c >= math.ceil(floor * n - 1e-9) for c, n in zip(counts, NUMELS))
    assert counts[1] == math.ceil(floor * NUMELS[1] - 1e-9)
    # The free layers still follow eps * raw, with a larger eps.
    raw = [sum(sh) / math.prod(sh) for sh in SHAPES]
    eps = (kept - counts[1]) / sum(raw[i] * NUMELS[i] for i in (0, 2, 3))
    for i in (0, 2, 3):
        assert abs(counts[i] - min(1.0, eps * raw[i]) * NUMELS[i]) < 1
    with pytest.raises(ValueError, match="min_density=0.2 keeps at least"):
        allocate("uniform", NAMES, SHAPES, 0.9, min_density=0.2)


def test_global_with_floor_reserves_each_layers_best():
    shapes = [(4, 8), (4, 8), (2, 8)]
    scores = [torch.rand(s) + 10 * i for i, s in enumerate(shapes)]  # layer 2 wins every global comparison
    alloc = allocate("global", ["a", "b", "c"], shapes, 0.75)
    assert alloc.group == [0, 0, 0] and alloc.ks == [target_kept(80, 0.75)] and not alloc.per_layer
    counts = allocate("global", ["a", "b", "c"], shapes, 0.75, min_density=0.1, scores=scores).ks
    assert counts == [4, 4, 12]  # floors ceil(3.2) = 4 in a and b, the rest of the 20 globally (all of c)


def test_lamp_allocation_is_the_global_selection_on_lamp_scores():
    torch.manual_seed(1)
    weights = [torch.randn(s) * (i + 1) for i, s in enumerate(SHAPES)]
    lamp = [lamp_transform(w) for w in weights]
    s = 0.95
    counts = allocate("lamp", NAMES, SHAPES, s, lamp_scores=lamp).ks
    flat = torch.cat([t.reshape(-1) for t in lamp])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:target_kept(flat.numel(), s)]] = True
    assert counts == [int(k.sum()) for k in keep.split(NUMELS)]
    # LAMP keeps every layer's largest weight (its score is 1).
    assert all(c >= 1 for c in counts)


def test_explicit_dict():
    counts = allocate({"conv1": 0.0, "fc1": 0.95}, NAMES, SHAPES, 0.5).ks
    assert counts == [432, 4608 - 2304, 32768 - round(0.95 * 32768), 320]
    assert allocate({"fc2": 0.99}, NAMES, SHAPES, 0.5, min_density=0.1).ks[3] == 64
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['fc3'\]"):
        allocate({"fc3": 0.5}, NAMES, SHAPES, 0.5)
    with pytest.raises(ValueError, match=r"allocation\['fc1'\]: expected a sparsity in \[0, 1\]"):
        allocate({"fc1": 1.5}, NAMES, SHAPES, 0.5)
    with pytest.raises(ValueError, match="allocation: expected one of"):
        allocate("erdos", NAMES, SHAPES, 0.5)


def test_apportion_and_fit_bounds():
    torch.manual_seed(0)
    targets = (torch.rand(9) * 50).tolist()
    total = round(sum(targets))
    counts = apportion(targets, total, [0] * 9, [60] * 9)
    assert sum(counts) == total and all(math.floor(t) <= c <= math.ceil(t) for t, c in zip(targets, counts))
    counts = apportion([2.5, 2.5, 2.5, 2.5], 10, [0] * 4, [10] * 4)
    assert counts == [3, 3, 2, 2]  # equal remainders: earlier layers first
    with pytest.raises(ValueError, match="cannot keep"):
        fit_densities([10, 10], [1.0, 1.0], 25, [0, 0], [1, 1])


def test_prune_realises_the_allocation_and_reports_it():
    model = sparsify(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(512, 64),
                                   nn.Linear(64, 10)))
    names = ["0", "1", "3", "4"]
    for allocation in ("uniform", "uniform+", "erk"):
        report = prune_(model, 0.8, "random", allocation, regrow=True, generator=torch.Generator().manual_seed(0))
        assert [layer.kept for layer in report.layers] == allocate(allocation, names, SHAPES, 0.8).ks
        assert report.kept == target_kept(sum(NUMELS), 0.8)
        assert [layer.density for layer in sparsity_report(model).layers] == [layer.density for layer in report.layers]
