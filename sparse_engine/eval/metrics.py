"""Metrics of a classifier's outputs beyond accuracy, and of two classifiers against each other.

Every function takes logits ``(N, C)`` (any float dtype; computed in float64) and labels
``(N,)`` int64, and returns Python floats.

* ``calibration_errors``: expected and maximum calibration error (Guo et al. 2017, "On Calibration
  of Modern Neural Networks"): confidences (the top softmax probability) fall into ``bins``
  equal-width bins ``(b/B, (b+1)/B]`` (the first also holds 0); ``ECE = sum_b |B_b|/N |acc_b - conf_b|``
  and ``MCE = max_b |acc_b - conf_b|`` over non-empty bins.
* ``class_accuracies`` / ``worst_class_accuracy``: accuracy of each class present in the labels, and
  the lowest (pruning can hurt some classes much more than the mean, Hooker et al. 2019).
* ``agreement``: the fraction of examples where two models predict the same top-1 class.
* ``output_distances``: mean over examples of the L2 and L-inf distances between two models'
  logits and between their softmax outputs (torchprune's ``norm_2_diff``/``norm_max_diff``,
  Liebenwein et al. 2021, "Lost in Pruning").
"""
import torch
from torch import Tensor


def _check_logits(logits: Tensor, name: str = "logits") -> Tensor:
    if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"{name}: expected a float tensor of shape (N, classes), got "
                         f"{getattr(logits, 'dtype', type(logits).__name__)} {tuple(getattr(logits, 'shape', ()))}")
    return logits.detach().double()


def _check_labels(labels: Tensor, n: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
        raise ValueError(f"labels: expected an int64 tensor of shape ({n},), got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")
    return labels


def _check_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    a, b = _check_logits(a, "logits"), _check_logits(b, "reference")
    if a.shape != b.shape:
        raise ValueError(f"reference: expected the shape of logits {tuple(a.shape)}, got {tuple(b.shape)}")
    return a, b.to(a.device)


def calibration_errors(logits: Tensor, labels: Tensor, bins: int = 15) -> tuple[float, float]:
    """``(ECE, MCE)`` of the softmax of ``logits`` against ``labels`` with ``bins`` equal-width bins."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins: expected an int >= 1, got {bins!r}")
    probs = _check_logits(logits).softmax(-1)
    labels = _check_labels(labels, probs.shape[0]).to(probs.device)
    if probs.shape[0] == 0:
        raise ValueError("logits: expected at least one example, got none")
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    interior = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=probs.device)[1:-1]
    which = torch.bucketize(conf, interior)  # bin b holds (b/B, (b+1)/B]
    count = torch.zeros(bins, dtype=torch.float64, device=probs.device).index_add_(0, which, torch.ones_like(conf))
    acc = torch.zeros_like(count).index_add_(0, which, correct)
    confs = torch.zeros_like(count).index_add_(0, which, conf)
    used = count > 0
    gaps = (acc[used] - confs[used]).abs() / count[used]
    ece = float((count[used] * gaps).sum() / probs.shape[0])
    return ece, float(gaps.max())


def class_accuracies(logits: Tensor, labels: Tensor) -> dict[int, float]:
    """``{class: accuracy}`` over the classes present in ``labels``."""
    logits = _check_logits(logits)
    labels = _check_labels(labels, logits.shape[0]).to(logits.device)
    correct = logits.argmax(-1) == labels
    return {int(c): float(correct[labels == c].double().mean()) for c in torch.unique(labels)}


def worst_class_accuracy(logits: Tensor, labels: Tensor) -> float:
    """The lowest per-class accuracy (``class_accuracies``)."""
    per_class = class_accuracies(logits, labels)
    if not per_class:
        raise ValueError("labels: expected at least one example, got none")
    return min(per_class.values())


def agreement(logits: Tensor, reference: Tensor) -> float:
    """Fraction of examples whose top-1 class is the same under both models."""
    a, b = _check_pair(logits, reference)
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def output_distances(logits: Tensor, reference: Tensor) -> dict[str, float]:
    """``{"logit_l2", "logit_linf", "softmax_l2", "softmax_linf"}``: per-example L2 and L-inf
    distances between the two models' logits and softmax outputs, averaged over examples."""
    a, b = _check_pair(logits, reference)
    out = {}
    for kind, (u, v) in (("logit", (a, b)), ("softmax", (a.softmax(-1), b.softmax(-1)))):
        diff = u - v
        out[f"{kind}_l2"] = float(torch.linalg.vector_norm(diff, 2, dim=-1).mean())
        out[f"{kind}_linf"] = float(diff.abs().amax(-1).mean())
    return out
