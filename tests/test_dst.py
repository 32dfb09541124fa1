"""Dynamic sparse training (SET, RigL): the drop-fraction schedule, the drop-and-grow selection by
hand and against its plain-torch reference, exact counts at every update, uniform SET regrowth,
grown weights and their optimizer state at zero, resume to identical masks, errors."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import sparse_modules, sparsify
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.pruning import (SET, RigL, drop_and_grow_, drop_and_grow_masks, drop_and_grow_masks_ref,
                                   drop_counts, drop_fraction_at, erk_densities, target_kept)


def mlp():
    return sparsify(nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))


def batches(n=4, size=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 12, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(n)]


DATA = batches()


def layer_counts(model):
    return {n: int(m.mask.sum()) for n, m in sparse_modules(model)}


def masks(model):
    return {n: m.mask for n, m in sparse_modules(model)}


def train(model, opt, pruner, steps, start=0, check=None):
    for t in range(start, start + steps):
        x, y = DATA[t % len(DATA)]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step()
        if check is not None:
            check(t + 1)


# -- the drop-fraction schedule -----------------------------------------------------------------

def test_drop_fraction_schedule_values():
    assert drop_fraction_at(0, 0.3, 600) == pytest.approx(0.3)
    assert drop_fraction_at(200, 0.3, 600) == pytest.approx(0.15 * 1.5)        # cos(pi/3) = 1/2
    assert drop_fraction_at(300, 0.3, 600) == pytest.approx(0.15)              # cos(pi/2) = 0
    assert drop_fraction_at(400, 0.3, 600) == pytest.approx(0.15 * 0.5)        # cos(2pi/3) = -1/2
    assert drop_fraction_at(600, 0.3, 600) == 0.0 and drop_fraction_at(700, 0.3, 600) == 0.0
    assert drop_fraction_at(150, 0.4, 600, "linear") == pytest.approx(0.3)
    assert drop_fraction_at(599, 0.4, 600, "constant") == 0.4
    with pytest.raises(ValueError, match="decay: expected one of"):
        drop_fraction_at(1, 0.3, 10, "exp")


def test_rigl_defaults_and_update_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = RigL(model, opt, 0.9, total_steps=1000, loss_fn=F.cross_entropy, data=DATA[0])
    assert (pruner.delta_t, pruner.drop_fraction, pruner.decay, pruner.stop) == (100, 0.3, "cosine", 0.75)
    assert pruner.end_step == 750
    assert [t for t in range(1, 1001) if pruner.update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    assert pruner.fraction_at(375) == pytest.approx(0.15)
    # ERK initial distribution, exact counts
    shapes = [tuple(m.weight.shape) for _, m in sparse_modules(model)]
    dens = erk_densities(shapes, 0.1)
    counts = list(layer_counts(model).values())
    assert sum(counts) == target_kept(sum(math.prod(s) for s in shapes), 0.9)
    for c, d, s in zip(counts, dens, shapes):
        assert abs(c - d * math.prod(s)) < 1


# -- the selection ------------------------------------------------------------------------------

def hand_layer():
    """A 4x6 layer keeping its first three columns, |w| = 1..12 row by row (signs mixed)."""
    layer = sparsify(SparseLinear(6, 4, bias=False))
    w = torch.zeros(4, 6)
    w[:, :3] = torch.arange(1.0, 13.0).view(4, 3) * torch.tensor([1.0, -1.0, 1.0])
    with torch.no_grad():
        layer.weight.copy_(w)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :3] = True
    layer.set_mask(mask)
    return layer, w, mask


def test_rigl_regrows_the_top_gradient_positions_by_hand():
    """loss = sum(c * (W x)), so dL/dW = c x^T: |g_ij| = |c_i| |x_j|. Drop 6 of 12: |w| = 1..6 are
    rows 0-1. Grow 6 among the 18 others: column 5 (|x| = 1e5, all four rows), then column 4's
    rows 3 and 2 (|c| = 4, 3)."""
    layer, w, mask = hand_layer()
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    c = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    x = torch.tensor([[1.0, -10.0, 100.0, -1e3, 1e4, -1e5]])
    pruner = RigL(model, opt, 0.5, total_steps=10, loss_fn=lambda out, t: (out * t).sum(), data=(x, c),
                  delta_t=1, drop_fraction=0.5, decay="constant", stop=1.0)
    layer.weight.data.copy_(w)
    layer.set_mask(mask)  # replace the random initial mask by the hand-made one (same count)
    opt.state[layer.weight] = {"momentum_buffer": torch.full((4, 6), 7.0)}  # stale state everywhere
    assert pruner.step()
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[2:, :3] = True     # the six largest |w| survive
    expected[:, 5] = True       # |g| = 1e5 |c_i|
    expected[2:, 4] = True      # |g| = 1e4 * 4, 1e4 * 3
    assert torch.equal(layer.mask, expected)
    assert torch.equal(layer.weight.detach(), torch.where(expected & mask, w, 0.0))  # grown weights start at 0
    buf = opt.state[layer.weight]["momentum_buffer"]
    grown = expected & ~mask
    assert (buf[grown] == 0).all() and (buf[expected & mask] == 7.0).all()
    assert pruner.last_update == {"step": 1, "fraction": 0.5, "dropped": 6, "grown": 6}


def test_a_dropped_weight_with_a_top_gradient_is_kept_as_it_was():
    """RigL's default (reinit_when_same=False): a weight dropped and grown back in one update keeps
    its value and optimizer state."""
    layer, w, mask = hand_layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    opt.state[layer.weight] = {"momentum_buffer": torch.full((4, 6), 7.0)}
    grow = torch.zeros(4, 6)
    grow[0, 0] = 100.0          # |w| = 1: dropped, then the best grow candidate
    grow[0, 3] = 50.0
    counts = drop_and_grow_([layer], [grow], 1 / 12, opt)   # drops floor(12 / 12) = 1 weight
    assert torch.equal(layer.mask, mask) and torch.equal(layer.weight.detach(), w)
    assert counts == {"dropped": 0, "grown": 0}
    assert (opt.state[layer.weight]["momentum_buffer"] == 7.0).all()
    drop_and_grow_([layer], [grow], 2 / 12, opt)            # drops |w| = 1, 2; grows (0, 0), (0, 3)
    expected = mask.clone()
    expected[0, 1] = False
    expected[0, 3] = True
    assert torch.equal(layer.mask, expected)
    assert layer.weight[0, 0] == w[0, 0] and layer.weight[0, 3] == 0 and layer.weight[0, 1] == 0
    assert opt.state[layer.weight]["momentum_buffer"][0, 3] == 0


def tie_free(shape, gen):
    n = math.prod(shape)
    return (torch.randperm(n, generator=gen).float() + 1).view(shape) / n


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_fast_selection_matches_the_reference(fraction):
    gen = torch.Generator().manual_seed(3)
    shapes = [(1, 7), (97, 131), (5, 3, 3, 3), (13, 1)]
    ms = [torch.rand(s, generator=gen) < d for s, d in zip(shapes, (0.5, 0.1, 0.3, 1.0))]
    drop = [tie_free(s, gen) for s in shapes]
    grow = [tie_free(s, gen).t() if len(s) == 2 else tie_free(s, gen) for s in shapes]
    grow = [g.reshape(s) if g.shape != s else g for g, s in zip(grow, shapes)]  # non-contiguous where transposed
    n_drop = drop_counts([int(m.sum()) for m in ms], fraction)
    fast = drop_and_grow_masks(ms, drop, grow, n_drop)
    ref = drop_and_grow_masks_ref(ms, drop, grow, n_drop)
    for f, r, m, d in zip(fast, ref, ms, n_drop):
        assert torch.equal(f, r)
        assert int(f.sum()) == int(m.sum())                       # counts exact
        assert int((m & ~f).sum()) <= d                            # at most d left
    # weights that left the mask were among the d smallest drop scores of the kept ones
    for f, m, s, d in zip(fast, ms, drop, n_drop):
        left = m & ~f
        n = int(m.sum())
        if left.any() and n > d:
            assert s[left].max() < s[m].sort(descending=True).values[n - d - 1]


def test_drop_and_grow_errors():
    m = torch.ones(2, 3, dtype=torch.bool)
    s = torch.rand(2, 3)
    with pytest.raises(ValueError, match=r"n_drop\[0\]: expected an int in \[0, 6\]"):
        drop_and_grow_masks([m], [s], [s], [7])
    with pytest.raises(ValueError, match=r"grow_scores\[0\]: contains NaN"):
        drop_and_grow_masks([m], [s], [torch.full((2, 3), float("nan"))], [1])
    with pytest.raises(ValueError, match=r"drop_scores\[0\]: expected shape \(2, 3\)"):
        drop_and_grow_masks([m], [torch.rand(3, 2)], [s], [1])
    with pytest.raises(ValueError, match=r"fraction: expected a drop fraction in \[0, 1\]"):
        drop_counts([4], 1.5)


# -- whole runs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["set", "rigl"])
def test_counts_exact_at_every_update(method):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    extra = dict(loss_fn=F.cross_entropy, data=lambda: DATA[0]) if method == "rigl" else {}
    cls = RigL if method == "rigl" else SET
    pruner = cls(model, opt, 0.8, total_steps=40, delta_t=3, stop=0.5, **extra)
    counts = layer_counts(model)
    changed_at = []

    def check(t):
        assert layer_counts(model) == counts, f"step {t}"
        for name, m in sparse_modules(model):
            assert (m.weight.detach()[~m.mask] == 0).all(), f"step {t}, layer {name}"
        if pruner.last_update is not None and pruner.last_update["step"] == t:
            changed_at.append(t)

    before = masks(model)
    train(model, opt, pruner, 40, check=check)
    assert changed_at == [3, 6, 9, 12, 15, 18]          # below end_step = 20
    assert any(not torch.equal(before[n], m) for n, m in masks(model).items())


def test_rigl_takes_the_dense_gradient_only_at_update_steps():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def data():
        calls.append(pruner.step_count)
        return DATA[0]

    pruner = RigL(model, opt, 0.7, total_steps=30, loss_fn=F.cross_entropy, data=data, delta_t=4)
    train(model, opt, pruner, 30)
    assert calls == [4, 8, 12, 16, 20]
    state = pruner.state_dict()
    # no dense copy of anything: the pruner keeps plain values only
    assert not any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in state.values())


def test_set_regrowth_is_uniform_over_the_positions_not_kept():
    """A 10x10 layer keeping 50 (tie-free |w|, so the drop is the same every time) drops 10:
    the 60 positions not kept after the drop should each be grown with probability 10/60. Over
    3000 draws, a chi-square statistic (59 degrees of freedom) above its 0.999 quantile fails."""
    torch.manual_seed(5)
    layer = sparsify(SparseLinear(10, 10, bias=False))
    model = nn.Sequential(layer)
    pruner = SET(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, total_steps=10, allocation="uniform")
    mask = layer.mask
    with torch.no_grad():
        layer.weight.copy_(tie_free((10, 10), torch.Generator().manual_seed(2)) * mask)
    w = layer.weight.detach().abs()
    survivors = mask & (w >= w[mask].sort(descending=True).values[39])   # the 40 largest kept |w|
    candidates = ~survivors
    assert int(candidates.sum()) == 60

    def chi2(counts, draws):
        expected = draws * 10 / 60
        return float(((counts - expected) ** 2 / expected).sum())

    draws = 3000
    grown = torch.zeros(10, 10)
    for _ in range(draws):
        new = drop_and_grow_masks([mask], [layer.weight.abs()], pruner.grow_scores(), [10])[0]
        assert torch.equal(new & survivors, survivors)
        grown += (new & candidates).float()
    counts = grown[candidates]
    df = 59
    q999 = df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3   # Wilson-Hilferty
    assert chi2(counts, draws) < q999
    # the bound can fail: a sampler that prefers low indices (here: the first 40 candidates
    # twice as often) is rejected by the same test
    biased = torch.cat([torch.full((40,), 2.0), torch.full((20,), 1.0)])
    biased = biased / biased.sum() * draws * 10
    assert chi2(biased, draws) > q999


def test_grown_weights_start_at_zero_with_cleared_state_under_a_tied_weight():
    """A weight shared with an embedding gets dense gradients, so its momentum is nonzero at pruned
    positions; a regrown weight must start at 0 with zero momentum anyway."""
    torch.manual_seed(0)
    emb = nn.Embedding(8, 6)
    head = sparsify(SparseLinear(6, 8, bias=False))
    head.weight = emb.weight  # tied, like sparse_engine.models.tied_lm
    head._init_mask()
    model = nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tokens = torch.randint(0, 8, (16,))

    def loss_fn(out, t):
        return F.cross_entropy(out, t)

    def forward(t):
        return model["head"](model["emb"](t))

    pruner = SET(model, opt, 0.5, total_steps=100, delta_t=5, drop_fraction=0.5, decay="constant")
    before = None
    for t in range(1, 6):
        opt.zero_grad()
        loss_fn(forward(tokens), tokens).backward()
        opt.step()
        if t == 5:
            before = head.mask
            buf = opt.state[head.weight]["momentum_buffer"]
            assert (buf[~before] != 0).any()  # the embedding's gradient reached pruned positions
        pruner.step()
    grown = head.mask & ~before
    assert grown.any()
    assert (head.weight.detach()[grown] == 0).all()
    assert (opt.state[head.weight]["momentum_buffer"][grown] == 0).all()


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_resume_mid_run_gives_identical_masks(method):
    def build(seed):
        torch.manual_seed(seed)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        extra = dict(loss_fn=F.cross_entropy, data=DATA[:2]) if method == "rigl" else {}
        return model, opt, (RigL if method == "rigl" else SET)(model, opt, 0.75, total_steps=40, delta_t=3, **extra)

    model, opt, pruner = build(0)
    history = []
    train(model, opt, pruner, 20, check=lambda t: history.append(masks(model)))

    model, opt, pruner = build(0)
    train(model, opt, pruner, 10)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt, pruner = build(123)  # another seed: another initial mask, overwritten by the loads
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    pruner.load_state_dict(saved["pruner"])
    resumed = []
    train(model, opt, pruner, 10, start=10, check=lambda t: resumed.append(masks(model)))
    for t, (a, b) in enumerate(zip(history[10:], resumed), start=11):
        assert all(torch.equal(a[n], b[n]) for n in a), f"step {t}"


def test_bad_arguments_name_them():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = dict(loss_fn=F.cross_entropy, data=DATA[0])
    cases = [
        (lambda: SET(model, opt, 1.0, 10), r"sparsity: expected a target sparsity in \[0, 1\)"),
        (lambda: SET(model, opt, 0.9, 0), r"total_steps: expected an int >= 1, got 0"),
        (lambda: SET(model, opt, 0.9, 10, delta_t=0), r"delta_t: expected an int >= 1"),
        (lambda: SET(model, opt, 0.9, 10, drop_fraction=1.5), r"drop_fraction: expected a number in \[0, 1\]"),
        (lambda: SET(model, opt, 0.9, 10, stop=0), r"stop: expected a number in \(0, 1\]"),
        (lambda: SET(model, opt, 0.9, 10, decay="step"), r"decay: expected one of"),
        (lambda: SET(model, opt, 0.9, 10, score="saliency"), r"score: the initial masks are drawn by one of"),
        (lambda: SET(model, opt, 0.9, 10, granularity="2:4"), r"unexpected argument\(s\) \['granularity'\]"),
        (lambda: SET(model, opt, 0.9, 10, allocation="erk2"), r"allocation: expected one of"),
        (lambda: SET(model, opt, 0.9, 10, score="magnitude", generator=3), r"generator: expected a torch.Generator"),
        (lambda: RigL(model, opt, 0.9, 10, loss_fn=3, data=DATA[0]), r"loss_fn: expected a callable"),
        (lambda: RigL(model, opt, 0.9, 10, loss_fn=F.cross_entropy, data=torch.ones(3)), r"data: expected a batch"),
        (lambda: RigL(model, opt, 0.9, 10, score="magnitude", generator=torch.Generator(), **rigl),
         r"generator: RigL reads it only for score='random'"),
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for make, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            make()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a failed construction"
