"""Helpers shared by the checkpoint tests: small pruned models and consistency checks."""
import io

import torch
from torch import nn

from sparse_engine import prune_, sparse_modules, sparsify


def mlp(widths=(13, 9, 7, 5)) -> nn.Sequential:
    """Linear layers of the given widths with ReLUs between (layer i at index 2*i)."""
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def pruned_mlp(sparsity=0.7, widths=(13, 9, 7, 5)) -> nn.Sequential:
    model = sparsify(mlp(widths))
    prune_(model, sparsity, allocation="uniform")
    return model


def masks(model) -> dict:
    return {n: u.mask for n, u in sparse_modules(model)}


def assert_consistent(model) -> None:
    """Every sparse layer's pruned weights are exact zeros: weights never disagree with masks."""
    for name, unit in sparse_modules(model):
        assert (unit.weight[~unit.mask] == 0).all(), f"{name}: non-zero weights at pruned positions"


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)
