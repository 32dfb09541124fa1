"""Global magnitude pruning: the library's default rule, ``prune_(model, sparsity)``."""
from torch import nn

from sparse_engine.nn.sparsify import SparsityReport
from sparse_engine.pruning.select.prune import prune_


def global_magnitude_prune_(model: nn.Module, sparsity: float) -> SparsityReport:
    """Prune the ``round(sparsity * n)`` smallest-|w| weights over all sparse layers of ``model``.

    ``n`` counts every weight of every sparse layer, pruned ones included; the count is rounded as
    ``torch.nn.utils.prune`` rounds it, and on tie-free weights the masks are those of
    ``torch.nn.utils.prune.global_unstructured(..., L1Unstructured, amount=sparsity)`` applied to the
    dense model (on an already pruned model torch reads a float amount as a fraction of the weights
    still kept; pass it the integer count instead). Weights
    already pruned stay pruned (a sparsity below the current one is an error). ``sparsity`` in
    [0, 1). Same as ``prune_(model, sparsity, "magnitude", "global")``; returns the report.
    """
    return prune_(model, sparsity, "magnitude", "global")
