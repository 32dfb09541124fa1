"""One pass over a test set that measures a pruned model beyond test accuracy, against its dense parent.

    from sparse_engine.eval import compare_models, model_metrics
    row = compare_models(pruned, dense, x_test, y_test)      # flat {name: float}
    row["agreement"], row["ece"], row["noise0.35_acc"], row["contrast_s3_acc"]

For every batch, each model runs once on the clean inputs, once per uniform-noise level and once
per corruption and severity, all on the same perturbed inputs (drawn from a generator seeded by
``seed``, so every call with the same arguments sees the same inputs). Then:

==================================  ===========================================================
key                                 value
==================================  ===========================================================
``accuracy``                        top-1 accuracy on the clean inputs
``ece``, ``mce``                    calibration errors, ``bins`` equal-width bins (``calibration_errors``)
``worst_class_accuracy``            the lowest per-class accuracy
``noise{eps:g}_acc``                accuracy under uniform noise of level eps (``uniform_noise``),
                                    in the normalised input space, for eps in ``noise_levels``
``noise_acc_mean``                  their mean over levels
``{corruption}_s{severity}_acc``    accuracy under a corruption (``corrupt``), applied to pixels
``corruption_acc_mean``             their mean over corruptions and severities
==================================  ===========================================================

``model_metrics(model, ...)`` returns those. ``compare_models(model, dense, ...)`` returns them
for ``model``, the same for ``dense`` prefixed ``dense_`` (``dense_accuracy``, ...), and how the
two relate: ``agreement`` (top-1 agreement), ``disagreements`` (count of clean examples where
their top-1 classes differ), ``logit_l2``, ``logit_linf``, ``softmax_l2``, ``softmax_linf``
(``output_distances``), ``noise{eps:g}_agreement``, ``noise_agreement_mean``,
``{corruption}_s{severity}_agreement`` and ``corruption_agreement_mean``. Every value is a float,
so a results table or a sweep store can keep them beside accuracy.

Corruptions act on pixels in [0, 1]: ``normalization=(mean, std)`` says how the inputs were
normalised (``x = (pixel - mean) / std``; default Fashion-MNIST's, as ``load_fashion_mnist``
returns), and None that the inputs are pixels already.
"""
import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_engine.data.fashion_mnist import MEAN, STD
from sparse_engine.eval.corruptions import CORRUPTIONS, NOISE_LEVELS, SEVERITIES, corrupt, uniform_noise
from sparse_engine.eval.metrics import calibration_errors, output_distances, worst_class_accuracy

FASHION_MNIST_NORMALIZATION = (MEAN, STD)


def _check_options(x, y, batch_size, noise_levels, corruptions, severities, bins, normalization, seed):
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x: expected float inputs with a batch dimension, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise ValueError(f"y: expected int64 labels of shape ({x.shape[0]},), got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one example, got none")
    for name, value in (("batch_size", batch_size), ("bins", bins), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name}: expected an int >= {0 if name == 'seed' else 1}, got {value!r}")
    levels = list(noise_levels)
    if not all(isinstance(e, numbers.Real) and not isinstance(e, bool) and math.isfinite(e) and e >= 0
               for e in levels):
        raise ValueError(f"noise_levels: expected finite numbers >= 0, got {noise_levels!r}")
    if len({f"{e:g}" for e in levels}) != len(levels):
        raise ValueError(f"noise_levels: expected distinct levels (by their key, f'{{eps:g}}'), got {noise_levels!r}")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown or len(set(corruptions)) != len(list(corruptions)):
        raise ValueError(f"corruptions: expected distinct names from {CORRUPTIONS}, got {list(corruptions)!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s in SEVERITIES for s in severities) \
            or len(set(severities)) != len(list(severities)):
        raise ValueError(f"severities: expected distinct ints from {SEVERITIES}, got {list(severities)!r}")
    if corruptions and x.dim() != 4:
        raise ValueError(f"corruptions: act on images (N, C, H, W), but x has shape {tuple(x.shape)}; "
                         f"pass corruptions=() for other inputs")
    if normalization is not None:
        ok = isinstance(normalization, (tuple, list)) and len(normalization) == 2 and all(
            isinstance(v, numbers.Real) and math.isfinite(v) for v in normalization) and normalization[1] > 0
        if not ok:
            raise ValueError(f"normalization: expected None or (mean, std) with std > 0, got {normalization!r}")
    return levels


class _Tally:
    """Correct counts per model and agreement counts for one kind of input."""

    def __init__(self, n_models: int):
        self.correct = [0] * n_models
        self.agree = 0

    def add(self, logits: list[Tensor], y: Tensor) -> None:
        preds = [z.argmax(-1) for z in logits]
        for i, p in enumerate(preds):
            self.correct[i] += int((p == y).sum())
        if len(preds) == 2:
            self.agree += int((preds[0] == preds[1]).sum())


@torch.no_grad()
def _one_pass(models: Sequence[nn.Module], x: Tensor, y: Tensor, *, batch_size: int, noise_levels,
              corruptions, severities, bins: int, normalization, seed: int,
              device: Optional[torch.device]) -> dict[str, float]:
    levels = _check_options(x, y, batch_size, noise_levels, corruptions, severities, bins, normalization, seed)
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{'model' if i == 0 else 'dense'}: expected an nn.Module, got {type(m).__name__}")
    if device is None:
        param = next(models[0].parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    mean, std = normalization if normalization is not None else (0.0, 1.0)
    generator = torch.Generator().manual_seed(seed)
    variants = [(f"noise{e:g}", ("noise", e)) for e in levels]
    variants += [(f"{c}_s{s}", ("corrupt", c, s)) for c in corruptions for s in severities]
    tallies = {key: _Tally(len(models)) for key, _ in variants}
    clean = [[] for _ in models]
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    for model in models:
        model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            for out, model in zip(clean, models):
                out.append(model(xb).float().cpu())
            for key, how in variants:
                if how[0] == "noise":
                    xv = uniform_noise(xb, how[1], generator)
                else:
                    xv = (corrupt(xb * std + mean, how[1], how[2], generator) - mean) / std
                tallies[key].add([model(xv) for model in models], yb)
    finally:
        for saved in modes:
            for m, training in saved:
                m.training = training

    n = x.shape[0]
    logits = [torch.cat(out) for out in clean]
    prefixes = ["", "dense_"][:len(models)]
    row: dict[str, float] = {}
    for i, (prefix, z) in enumerate(zip(prefixes, logits)):
        ece, mce = calibration_errors(z, y.cpu(), bins)
        row[f"{prefix}accuracy"] = float((z.argmax(-1) == y.cpu()).double().mean())
        row[f"{prefix}ece"], row[f"{prefix}mce"] = ece, mce
        row[f"{prefix}worst_class_accuracy"] = worst_class_accuracy(z, y.cpu())
        for key, _ in variants:
            row[f"{prefix}{key}_acc"] = tallies[key].correct[i] / n
        _means(row, prefix, variants, "acc")
    if len(models) == 2:
        agree = int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
        row["agreement"] = agree / n
        row["disagreements"] = float(n - agree)
        row.update(output_distances(logits[0], logits[1]))
        for key, _ in variants:
            row[f"{key}_agreement"] = tallies[key].agree / n
        _means(row, "", variants, "agreement")
    return row


def _means(row: dict, prefix: str, variants, what: str) -> None:
    for kind, name in (("noise", "noise"), ("corrupt", "corruption")):
        keys = [key for key, how in variants if how[0] == kind]
        if keys:
            row[f"{prefix}{name}_{what}_mean"] = sum(row[f"{prefix}{k}_{what}"] for k in keys) / len(keys)


def model_metrics(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
                  noise_levels: Sequence[float] = NOISE_LEVELS, corruptions: Sequence[str] = CORRUPTIONS,
                  severities: Sequence[int] = SEVERITIES, bins: int = 15,
                  normalization: Optional[tuple[float, float]] = FASHION_MNIST_NORMALIZATION, seed: int = 0,
                  device: Optional[torch.device] = None) -> dict[str, float]:
    """The metrics of ``model`` alone on inputs ``x`` ``(N, ...)`` float and labels ``y`` ``(N,)``
    int64 (module docstring); ``device`` defaults to the model's. The model runs in eval mode
    under ``no_grad``; its train/eval modes are restored."""
    return _one_pass([model], x, y, batch_size=batch_size, noise_levels=noise_levels, corruptions=corruptions,
                     severities=severities, bins=bins, normalization=normalization, seed=seed, device=device)


def compare_models(model: nn.Module, dense: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
                   noise_levels: Sequence[float] = NOISE_LEVELS, corruptions: Sequence[str] = CORRUPTIONS,
                   severities: Sequence[int] = SEVERITIES, bins: int = 15,
                   normalization: Optional[tuple[float, float]] = FASHION_MNIST_NORMALIZATION, seed: int = 0,
                   device: Optional[torch.device] = None) -> dict[str, float]:
    """``model`` (the pruned one) against ``dense`` (its parent), in one pass (module docstring)."""
    return _one_pass([model, dense], x, y, batch_size=batch_size, noise_levels=noise_levels,
                     corruptions=corruptions, severities=severities, bins=bins, normalization=normalization,
                     seed=seed, device=device)
