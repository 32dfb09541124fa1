"""Metrics of a trained model, by name: what a sweep file's ``metrics = [...]`` lists.

Every metric returns named numbers (``{"test_accuracy": 0.85}``); a trial's final metrics are one
open dict of them, stored as they are, so that new metrics (calibration, robustness, ...) land
beside accuracy without a change to the store. Two kinds:

* ``"logits"``: ``fn(logits, targets) -> {name: number}`` on the test set's logits, which are
  computed once for all such metrics (float32 ``(n, classes)``, int64 ``(n,)``);
* ``"model"``: ``fn(model, x_test, y_test, device) -> {name: number}`` for metrics that need the
  model itself;
* ``"parent"``: ``fn(model, parent, x_test, y_test, device) -> {name: number}`` for metrics that
  compare a pruned model with the dense parent it started from (``parent`` is None for the parent's
  own trial and for methods that start from a fresh initialisation).

Built in: ``accuracy`` (``test_accuracy``), ``loss`` (``test_loss``) and ``beyond_accuracy``: the
metrics of :mod:`sparse_engine.eval` (calibration, worst-class accuracy, accuracy under noise and
corruptions; against the parent also agreement and output distances, and the parent's own metrics
prefixed ``dense_``). It reads the inputs as images normalised as Fashion-MNIST's (``load_fashion_mnist``);
for other data register a metric that calls ``sparse_engine.eval.compare_models`` with their
``normalization``.

Register one with :func:`register_metric`, or name ``package.module:function`` (a logits metric)
in the sweep file.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.sweep.fields import Invalid, is_import_path
from sparse_engine.train import batches

EVAL_BATCH = 1024


@dataclass(frozen=True)
class Metric:
    fn: Callable[..., dict]
    kind: str = "logits"


def _accuracy(logits: Tensor, targets: Tensor) -> dict:
    return {"test_accuracy": (logits.argmax(-1) == targets).sum().item() / max(targets.numel(), 1)}


def _loss(logits: Tensor, targets: Tensor) -> dict:
    return {"test_loss": F.cross_entropy(logits.float(), targets).item()}


def _beyond_accuracy(model: nn.Module, parent, x: Tensor, y: Tensor, device) -> dict:
    from sparse_engine.eval import compare_models, model_metrics
    if parent is None:
        return model_metrics(model, x, y, device=device)
    return compare_models(model, parent, x, y, device=device)


METRICS: dict = {"accuracy": Metric(_accuracy), "loss": Metric(_loss),
                 "beyond_accuracy": Metric(_beyond_accuracy, "parent")}
KINDS = ("logits", "model", "parent")


def register_metric(name: str, fn: Callable[..., dict], kind: str = "logits", *, replace: bool = False) -> None:
    """Add a metric under ``name`` (``kind``: "logits" or "model", module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not callable(fn):
        raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
    if name in METRICS and not replace:
        raise ValueError(f"name: metric {name!r} is already registered (pass replace=True to replace it)")
    METRICS[name] = Metric(fn, kind)


def lookup_metric(name: str) -> Metric:
    if is_import_path(name):
        from sparse_engine.sweep.methods import import_object
        obj = import_object(name)
        return obj if isinstance(obj, Metric) else Metric(obj)
    if name not in METRICS:
        raise Invalid(f"expected one of {', '.join(sorted(METRICS))} or 'package.module:function', got {name!r}")
    return METRICS[name]


@torch.no_grad()
def test_logits(model: nn.Module, x: Tensor, y: Tensor, device) -> Tensor:
    """The model's logits on ``x`` in eval mode, float32 on the CPU."""
    model.eval()
    out = [model(xb.to(device)).float().cpu() for xb, _ in batches(x, y, EVAL_BATCH, shuffle=False)]
    return torch.cat(out) if out else torch.empty(0)


def needs_parent(names: Sequence[str]) -> bool:
    """Whether any metric in ``names`` compares with the parent (kind ``"parent"``)."""
    return any(lookup_metric(n).kind == "parent" for n in names)


def evaluate_metrics(names: Sequence[str], model: nn.Module, x: Tensor, y: Tensor, device,
                     parent: Optional[nn.Module] = None) -> dict:
    """``{metric name: number}`` of every metric in ``names`` (a ValueError names a metric that
    returns something other than finite-or-nan numbers); ``parent`` is what ``"parent"`` metrics
    compare with."""
    metrics = [(n, lookup_metric(n)) for n in names]
    logits = test_logits(model, x, y, device) if any(m.kind == "logits" for _, m in metrics) else None
    out: dict = {}
    for name, metric in metrics:
        if metric.kind == "logits":
            values = metric.fn(logits, y)
        elif metric.kind == "parent":
            values = metric.fn(model, parent, x, y, device)
        else:
            values = metric.fn(model, x, y, device)
        if not isinstance(values, dict):
            raise ValueError(f"metric {name!r}: expected a dict {{name: number}}, got {type(values).__name__}")
        for k, v in values.items():
            v = float(v)
            if math.isinf(v):
                raise ValueError(f"metric {name!r}: {k} is infinite")
            out[k] = v
    model.train()
    return out
