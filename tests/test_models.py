"""The reference models: shapes, parameter counts, and that every one trains a step."""
import pytest
import torch
import torch.nn.functional as F

from sparse_engine.models import MODELS, build_model, example_batch


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = build_model(name)
    x, y = example_batch(name, 3, generator=torch.Generator().manual_seed(1))
    out = model(x)
    logits = out.flatten(0, -2) if out.dim() == 3 else out
    F.cross_entropy(logits, y.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_parameter_counts():
    # ResNet-18 with the CIFAR stem and 10 classes has 11,173,962 parameters (the usual figure).
    counts = {n: sum(p.numel() for p in build_model(n).parameters()) for n in
              ("fashion_mlp", "second_order_mlp", "resnet18")}
    assert counts == {"fashion_mlp": 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10,
                      "second_order_mlp": 784 * 40 + 40 * 20 + 20 * 10, "resnet18": 11_173_962}


def test_tied_lm_shares_one_parameter():
    model = build_model("tied_lm")
    assert model.decoder.weight is model.embed.weight


def test_bad_names():
    with pytest.raises(ValueError, match="name: expected one of"):
        build_model("resnet50")
    with pytest.raises(ValueError, match="batch_size"):
        example_batch("lstm", 0)
