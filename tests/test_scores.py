"""Pruning scores against independent plain-torch computations on dense copies (float64)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import sparsify
from sparse_engine.pruning import (custom_scores, fggp_keep_scores, gradient_scores, grasp_scores, lamp_scores,
                                   lamp_transform, magnitude_scores, random_scores, saliency_scores, synflow_scores,
                                   wanda_scores)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect")
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv2(self.bn(self.conv1(x)).relu()).flatten(1))


LAYERS = ("conv1", "conv2", "fc")


def models():
    """A dense float64 CNN and its sparse copy, half of conv1 pruned (masks matter for gradients)."""
    dense = CNN().double()
    sparse = sparsify(copy.deepcopy(dense))
    sparse.conv1.set_mask(torch.rand(sparse.conv1.weight.shape) < 0.5)
    with torch.no_grad():
        dense.conv1.weight.copy_(sparse.conv1.weight)
    return dense, sparse


def batch(n=4):
    return torch.randn(n, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (n,))


def dense_grads(model, x, y):
    weights = [getattr(model, n).weight for n in LAYERS]
    return torch.autograd.grad(F.cross_entropy(model(x), y), weights)


def test_magnitude_and_lamp():
    _, sparse = models()
    scores = magnitude_scores(sparse)
    assert list(scores) == list(LAYERS)
    for name in LAYERS:
        w = getattr(sparse, name).weight
        assert scores[name].dtype == torch.float32 and torch.equal(scores[name], w.detach().abs().float())
    # w^2 sorted ascending: 0.25, 1, 4, 9; suffix sums 14.25, 14, 13, 9.
    lamp = lamp_transform(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    torch.testing.assert_close(lamp, torch.tensor([[1 / 14, 4 / 13], [1.0, 0.25 / 14.25]]))
    assert lamp_transform(torch.zeros(2, 3)).eq(0).all()
    assert lamp_scores(sparse, names=["fc"])["fc"].max() == 1.0


def test_gradient_and_saliency_are_dense_gradients():
    dense, sparse = models()
    sparse.train()
    x, y = batch()
    running = sparse.bn.running_mean.clone()
    expected = dense_grads(dense, x, y)
    g = gradient_scores(sparse, F.cross_entropy, (x, y))
    sal = saliency_scores(sparse, F.cross_entropy, [(x, y)])
    for name, e in zip(LAYERS, expected):
        torch.testing.assert_close(g[name], e.abs().float())
        torch.testing.assert_close(sal[name], (getattr(sparse, name).weight * e).abs().float())
    pruned = ~sparse.conv1.mask
    assert (g["conv1"][pruned] > 0).any()  # pruned weights get their gradient (what regrowth needs)
    assert torch.equal(sparse.bn.running_mean, running)  # buffers restored
    assert all(p.grad is None for p in sparse.parameters())
    # Averaged over batches.
    x2, y2 = batch()
    two = gradient_scores(sparse, F.cross_entropy, [(x, y), (x2, y2)])
    expected2 = dense_grads(dense, x2, y2)
    torch.testing.assert_close(two["fc"], ((expected[2] + expected2[2]) / 2).abs().float())


def test_gradient_from_dot_grad():
    _, sparse = models()
    x, y = batch()
    F.cross_entropy(sparse(x), y).backward()
    g = gradient_scores(sparse)
    assert torch.equal(g["fc"], sparse.fc.weight.grad.abs().float())
    assert g["conv1"][~sparse.conv1.mask].eq(0).all()  # a sparse layer's .grad is masked
    sparse.fc.weight.grad = None
    with pytest.raises(ValueError, match="needs loss_fn and data .*layer 'fc' has none"):
        gradient_scores(sparse)
    with pytest.raises(ValueError, match="needs both loss_fn and data"):
        saliency_scores(sparse, F.cross_entropy)


def test_grasp_is_w_times_hessian_gradient_product():
    dense, sparse = models()
    dense.eval()
    sparse.eval()
    x, y = batch()
    names = [n + ".weight" for n in LAYERS]
    weights = tuple(dict(dense.named_parameters())[n].detach() for n in names)

    def loss(*ws):
        return F.cross_entropy(torch.func.functional_call(dense, dict(zip(names, ws)), (x,)), y)

    g = torch.autograd.grad(loss(*[w.requires_grad_() for w in weights]), weights)
    _, hg = torch.autograd.functional.hvp(loss, weights, g)
    scores = grasp_scores(sparse, F.cross_entropy, (x, y))
    for name, w, h in zip(LAYERS, weights, hg):
        # GraSP removes the largest S = -w * Hg; the score is -S, so keeping the largest is GraSP's rule.
        torch.testing.assert_close(scores[name], (w * h).float(), rtol=1e-5, atol=1e-7)
    hot = grasp_scores(sparse, F.cross_entropy, (x, y), temperature=200.0)
    assert not torch.allclose(hot["fc"], scores["fc"])


def test_synflow_matches_linearised_dense_model_and_restores_it():
    dense, sparse = models()
    sparse.train()
    ref = copy.deepcopy(dense).eval()
    with torch.no_grad():
        for t in list(ref.parameters()) + list(ref.buffers()):
            if t.is_floating_point():
                t.abs_()
    weights = [getattr(ref, n).weight for n in LAYERS]
    grads = torch.autograd.grad(ref(torch.ones(1, 3, 8, 8, dtype=torch.float64)).sum(), weights)
    before = copy.deepcopy(sparse.state_dict())
    scores = synflow_scores(sparse, (1, 3, 8, 8))
    for name, w, g in zip(LAYERS, weights, grads):
        torch.testing.assert_close(scores[name], (w * g).abs().float())
    assert scores["conv1"][~sparse.conv1.mask].eq(0).all()
    after = sparse.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # signs restored exactly
    assert all(m.training for m in sparse.modules())
    with pytest.raises(ValueError, match="needs input_shape"):
        synflow_scores(sparse, None)


def test_wanda_linear_and_conv_columns():
    _, sparse = models()
    xs = [batch()[0], batch(3)[0]]
    running = sparse.bn.running_var.clone()
    scores = wanda_scores(sparse, [(x, None) for x in xs])
    assert torch.equal(sparse.bn.running_var, running)
    # Inputs of each layer, from the plain modules.
    with torch.no_grad():
        a1 = [x for x in xs]
        a2 = [sparse.bn(sparse.conv1(x)).relu() for x in xs]
        a3 = [sparse.conv2(a).flatten(1) for a in a2]
    fc_norm = torch.cat(a3).square().sum(0).sqrt()
    torch.testing.assert_close(scores["fc"], (sparse.fc.weight.abs() * fc_norm).float())

    def conv_column_norms(conv, inputs, mode):
        """||x_(c, i, j)|| over batch and output positions, by slicing the padded input."""
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        total = 0
        for x in inputs:
            p = conv.padding[0]
            xp = F.pad(x, (p, p, p, p), mode=mode)
            ho = (xp.shape[2] - kh) // sh + 1
            wo = (xp.shape[3] - kw) // sw + 1
            cols = torch.stack([xp[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                                for i in range(kh) for j in range(kw)], 2)  # (N, C, kh*kw, ho, wo)
            total = total + cols.square().sum((0, 3, 4))
        return total.sqrt()  # (C, kh*kw)

    n1 = conv_column_norms(sparse.conv1, a1, "constant").reshape(-1)
    torch.testing.assert_close(scores["conv1"], (sparse.conv1.weight.abs() * n1.view(3, 3, 3)).float())
    n2 = conv_column_norms(sparse.conv2, a2, "reflect").view(2, 4, 3, 3)  # groups=2: 4 input channels each
    expected = sparse.conv2.weight.abs() * n2.repeat_interleave(3, 0)  # 6 outputs, 3 per group
    torch.testing.assert_close(scores["conv2"], expected.float())


def test_random_is_seeded():
    _, sparse = models()
    a = random_scores(sparse, torch.Generator().manual_seed(3))
    b = random_scores(sparse, torch.Generator().manual_seed(3))
    c = random_scores(sparse, torch.Generator().manual_seed(4))
    assert all(torch.equal(a[n], b[n]) for n in LAYERS) and not torch.equal(a["fc"], c["fc"])
    assert a["fc"].dtype == torch.float32 and ((a["fc"] >= 0) & (a["fc"] < 1)).all()
    with pytest.raises(TypeError, match="generator: expected a torch.Generator"):
        random_scores(sparse, 3)


def test_custom_scores_validation():
    _, sparse = models()
    good = {n: torch.randn(getattr(sparse, n).weight.shape, dtype=torch.float64) for n in LAYERS}
    out = custom_scores(sparse, good)
    assert out["fc"].dtype == torch.float32 and out["fc"] is not good["fc"]
    assert list(custom_scores(sparse, {"fc": good["fc"]}, names=["fc"])) == ["fc"]
    cases = [({**good, "head": good["fc"]}, ValueError, r"unknown layer name\(s\) \['head'\]"),
             ({"fc": good["fc"]}, ValueError, r"missing scores for layer\(s\) \['conv1', 'conv2'\]"),
             ({**good, "fc": good["fc"].T}, ValueError, r"score\['fc'\]: expected shape \(5, 96\)"),
             ({**good, "fc": good["fc"].long()}, TypeError, r"score\['fc'\]: expected a floating-point tensor"),
             ({**good, "fc": good["fc"].clone().fill_(float("nan"))}, ValueError, r"score\['fc'\]: contains NaN")]
    for scores, error, match in cases:
        with pytest.raises(error, match=match):
            custom_scores(sparse, scores)


def test_fggp_keep_scores_gradient_first_magnitude_next():
    w = torch.tensor([[0.1, -0.2, 0.3, 0.4], [-0.5, 0.6, 0.7, -0.8]])
    g = torch.tensor([[0.9, -0.3, 0.4, 0.8], [0.7, 0.1, -0.2, 0.6]])
    kept = torch.ones(2, 4, dtype=torch.bool)
    # Prune 2 (keep 6) at rate 2: candidates = 4 lowest |g| = {1, 2, 5, 6}; prune their 2 lowest |w| = {1, 2}.
    score = fggp_keep_scores([w], [g], [kept], [6], [0], rate=2.0)[0]
    inf = float("inf")
    assert score.tolist() == [[inf, pytest.approx(0.2), pytest.approx(0.3), inf],
                              [inf, pytest.approx(0.6), pytest.approx(0.7), inf]]
    kept[0, 1:3] = False
    # Keep 4 of the remaining 6: candidates = 4 lowest |g| among kept = {5, 6, 7, 4}.
    score = fggp_keep_scores([w], [g], [kept], [4], [0], rate=2.0)[0]
    assert score[0, 1:3].eq(-inf).all() and score[0, [0, 3]].eq(inf).all()
    assert score[1].tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])
    # Rate 1: the candidates are exactly the lowest-|g| weights.
    score = fggp_keep_scores([w], [g], [kept], [5], [0], rate=1.0)[0]
    assert score[1, 1].item() == pytest.approx(0.6) and score[1, [0, 2, 3]].eq(inf).all()
    with pytest.raises(ValueError, match="rate: expected a finite number >= 1"):
        fggp_keep_scores([w], [g], [kept], [4], [0], rate=0.5)
    with pytest.raises(ValueError, match="fggp only prunes"):
        fggp_keep_scores([w], [g], [kept], [7], [0], rate=2.0)
