"""Global magnitude pruning with a plain-torch selection (concatenate, then ``torch.topk``).

This is the reference rule: the fast streaming selection replaces the concatenation later, and
must give the same masks on tie-free inputs.
"""
import torch
from torch import nn

from sparse_engine.nn.sparsify import SparsityReport, sparse_modules, sparsity_report


@torch.no_grad()
def global_magnitude_prune_(model: nn.Module, sparsity: float) -> SparsityReport:
    """Prune the ``round(sparsity * n)`` smallest-|w| weights over all sparse layers of ``model``.

    ``n`` counts every weight of every sparse layer, pruned ones included, and the count is
    rounded as ``torch.nn.utils.prune`` rounds it. Weights already pruned have |w| = 0, so they
    stay pruned. Returns the model's sparsity report.
    """
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity: expected a number in [0, 1], got {sparsity!r}")
    layers = [m for _, m in sparse_modules(model)]
    if not layers:
        raise ValueError("model: expected a model with sparse layers (call sparse_engine.sparsify first), found none")
    scores = torch.cat([m.weight.detach().abs().flatten().float() for m in layers])
    n_prune = round(sparsity * scores.numel())
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        keep[torch.topk(scores, n_prune, largest=False, sorted=False).indices] = False
    for m, k in zip(layers, keep.split([m.weight.numel() for m in layers])):
        m.set_mask(k.view_as(m.weight))
    return sparsity_report(model)
