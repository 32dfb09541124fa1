"""Sparse layers and the model API: sparsify/densify, masks, state_dict, report, compile."""
import copy

import pytest
import torch
from torch import nn

from sparse_checkpoints import roundtrip
from sparse_engine import (SparseConv2d, SparseLinear, densify, mask_optimizer, sparsify, sparse_modules,
                           sparsity_report)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 7 * 7, 33), nn.ReLU(), nn.Linear(33, 10))
        self.norm = nn.LayerNorm(10)

    def forward(self, x):
        return self.norm(self.head(self.conv2(self.conv(x).relu())))


def random_masks(model, density=0.5):
    for _, m in sparse_modules(model):
        m.set_mask(torch.rand(m.weight.shape, device=m.weight.device) < density)


def test_sparsify_keeps_parameters_and_outputs():
    model = Net().double()
    model.head[1].weight.requires_grad_(False)
    params = dict(model.named_parameters())
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    dense_out = model(x)
    assert sparsify(model) is model
    assert isinstance(model.conv, SparseConv2d) and isinstance(model.conv2, SparseConv2d)
    assert isinstance(model.head[1], SparseLinear) and isinstance(model.head[3], SparseLinear)
    assert isinstance(model.norm, nn.LayerNorm)
    for name, p in model.named_parameters():
        assert p is params[name]
        assert p.dtype == torch.float64
    assert not model.head[1].weight.requires_grad
    torch.testing.assert_close(model(x), dense_out, rtol=1e-12, atol=1e-12)
    assert sparsity_report(model).density == 1.0


def test_include_exclude_and_unsupported_layers():
    model = sparsify(Net(), include=["head.*"], exclude="head.3")
    assert isinstance(model.head[1], SparseLinear)
    assert type(model.head[3]) is nn.Linear and type(model.conv) is nn.Conv2d
    model = sparsify(Net(), include=lambda name, m: name == "conv")
    assert isinstance(model.conv, SparseConv2d) and type(model.conv2) is nn.Conv2d
    with pytest.raises(TypeError, match="layer 'norm' of type LayerNorm .* not supported"):
        sparsify(Net(), include=["norm"])
    with pytest.raises(TypeError, match="include: expected None, a name pattern"):
        sparsify(Net(), include=[3])
    with pytest.raises(ValueError, match="backend: expected one of"):
        sparsify(Net(), backend="cutlass")
    mha = nn.MultiheadAttention(8, 2)
    sparsify(mha)  # out_proj (a Linear subclass whose weight the parent reads) is converted with it
    assert [n for n, _ in sparse_modules(mha)] == ["in_proj_weight", "out_proj"]


def test_masked_forward_equals_dense_with_masked_weight():
    torch.manual_seed(1)
    model = sparsify(Net().double())
    random_masks(model, 0.3)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    reference = densify(copy.deepcopy(model))
    torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_mask_property_and_set_mask():
    layer = SparseLinear(37, 5)
    mask = torch.rand(5, 37) < 0.4
    layer.set_mask(mask)
    assert torch.equal(layer.mask, mask)
    assert (layer.weight[~mask] == 0).all() and (layer.weight[mask] != 0).all()
    assert layer.mask_bits.shape == (5, 2) and layer.mask_bits.dtype == torch.int32
    with pytest.raises(ValueError, match=r"mask: expected shape \(5, 37\)"):
        layer.set_mask(torch.ones(5, 36, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        layer.set_mask(torch.ones(5, 37))
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu"):
        layer.set_mask(torch.ones(5, 37, dtype=torch.bool, device="meta"))
    assert torch.equal(layer.mask, mask), "a rejected mask must leave the layer unchanged"


def test_mask_memory_is_one_bit_per_weight():
    layer = SparseLinear(4096, 1024, dtype=torch.bfloat16)
    mask_bytes = layer.mask_bits.numel() * layer.mask_bits.element_size()
    weight_bytes = layer.weight.numel() * layer.weight.element_size()
    assert mask_bytes * 16 == weight_bytes


def test_densify_leaves_exact_zeros():
    model = sparsify(Net())
    random_masks(model)
    masks = {n: m.mask for n, m in sparse_modules(model)}
    densify(model)
    assert type(model.conv) is nn.Conv2d and type(model.head[1]) is nn.Linear
    assert "mask_bits" not in dict(model.named_buffers())
    for name, mask in masks.items():
        w = model.get_submodule(name).weight
        assert (w[~mask] == 0).all()


def test_state_dict_strict_both_ways_and_masks_restored():
    sparse = sparsify(Net())
    random_masks(sparse)
    sd = roundtrip(sparse.state_dict())
    assert set(sd) == set(Net().state_dict())
    dense = Net()
    dense.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(dense(x), sparse(x))

    restored = sparsify(Net())
    restored.load_state_dict(sd, strict=True)
    for (_, a), (_, b) in zip(sparse_modules(sparse), sparse_modules(restored)):
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.weight, b.weight)

    # A dense checkpoint loads into a sparse model exactly, with dense masks.
    dense_sd = Net().state_dict()
    restored.load_state_dict(dense_sd, strict=True)
    assert sparsity_report(restored).density == 1.0
    assert torch.equal(restored.head[1].weight, dense_sd["head.1.weight"])


def test_sparsity_report():
    model = sparsify(Net())
    model.head[1].set_mask(torch.arange(33 * 196).reshape(33, 196) % 4 == 0)
    report = sparsity_report(model)
    names = [layer.name for layer in report.layers]
    assert names == ["conv", "conv2", "head.1", "head.3"]
    head = report.layers[2]
    assert head.shape == (33, 196) and head.kept == 33 * 196 // 4 and head.density == 0.25
    assert report.numel == sum(m.weight.numel() for _, m in sparse_modules(model))
    assert report.kept == report.numel - 33 * 196 * 3 // 4
    text = str(report)
    assert "head.1" in text and "global" in text and "0.2500" in text


def test_compile_fullgraph_model():
    torch._dynamo.reset()
    model = sparsify(Net())
    random_masks(model)
    x = torch.randn(2, 3, 7, 7)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert (model.head[1].weight.grad[~model.head[1].mask] == 0).all()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1, amsgrad=True),
    lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, centered=True),
    lambda p: torch.optim.Adagrad(p, lr=1e-2, initial_accumulator_value=0.1),
], ids=["sgd-momentum-wd", "sgd-nesterov", "adam-wd", "adamw-amsgrad", "rmsprop", "adagrad"])
def test_pruned_weights_stay_zero_through_optimizers(make_opt):
    model = sparsify(Net())
    opt = make_opt(model.parameters())
    mask_optimizer(opt, model)
    x, y = torch.randn(8, 3, 7, 7), torch.randint(0, 10, (8,))
    for step in range(6):
        if step == 3:  # masks change mid-training, with momentum/moments already built up
            random_masks(model, 0.5)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for name, m in sparse_modules(model):
            assert (m.weight[~m.mask] == 0).all(), f"{name}: pruned weight revived at step {step}"
            for key, value in opt.state[m.weight].items():
                if isinstance(value, torch.Tensor) and value.shape == m.weight.shape:
                    assert (value[~m.mask] == 0).all(), f"{name}: optimizer state '{key}' kept at pruned entries"


def test_without_mask_optimizer_momentum_revives_pruned_weights():
    """The failure mask_optimizer exists for: shows the test above can fail."""
    model = sparsify(Net())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 7, 7), torch.randint(0, 10, (8,))
    for step in range(4):
        if step == 2:
            random_masks(model, 0.5)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert any((m.weight[~m.mask] != 0).any() for _, m in sparse_modules(model))


def test_mask_optimizer_bad_input():
    with pytest.raises(ValueError, match="model: expected a model with sparse layers"):
        mask_optimizer(torch.optim.SGD(Net().parameters(), lr=0.1), Net())
    with pytest.raises(TypeError, match="optimizer: expected a torch.optim.Optimizer"):
        mask_optimizer("sgd", sparsify(Net()))
