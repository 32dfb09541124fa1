"""``recalibrate_bn``: recompute BatchNorm running statistics after the weights changed.

Pruning changes the distribution of every activation after the pruned layers, so the running
mean and variance that BatchNorm uses in eval mode no longer match; re-estimating them on a few
training batches recovers much of the accuracy lost to the prune without any gradient step
(the "adaptive batch normalization" of Li et al. 2020, "EagleEye: Fast Sub-net Evaluation for
Efficient Neural Network Pruning"; ``torch.optim.swa_utils.update_bn`` does the same for weight
averages).
"""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _input_batches(data):
    """One batch of inputs (a tensor), one ``(inputs, targets)`` pair, or an iterable of batches
    (each a tensor or a tuple/list whose first element is the inputs), as prune_'s ``data``."""
    if isinstance(data, Tensor):
        yield data
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        yield data[0]  # one batch, as prune_ reads ``data`` (wrap two input batches in a list of 1-tuples)
        return
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data: expected a tensor of inputs, an (inputs, targets) batch or an iterable of "
                        f"batches, got {type(data).__name__}") from None
    for i, batch in enumerate(iterator):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"data: batch {i}: expected a tensor or a tuple whose first element is the inputs, "
                            f"got {type(x).__name__}")
        yield x


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, batches: Optional[int] = None) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``model`` from ``data``.

    Each BatchNorm layer that tracks running statistics is reset (mean 0, variance 1, count 0)
    and given ``momentum=None``, so that after ``N`` batches its statistics are the cumulative
    average over those batches (``running = running + (batch - running) / (k + 1)``, as torch's
    BatchNorm does with ``momentum=None``). The model runs in train mode under ``no_grad`` over the
    first ``batches`` batches of ``data`` (all of them when None); afterwards every module's
    train/eval mode and every BatchNorm's momentum are restored. Weights and gradients are not
    touched. Dropout and other train-mode layers run as in training (as in
    ``torch.optim.swa_utils.update_bn``), so they draw from torch's RNG.

    Args:
        model: any module; without tracking BatchNorm layers nothing runs and 0 is returned.
        data: a tensor (one batch of inputs), an ``(inputs, targets)`` batch, or an iterable of
            batches, each a tensor or a tuple/list whose first element is the inputs. Inputs are
            moved to the device of the model's first parameter.
        batches: how many batches to use (int >= 1), or None for all of ``data``.
    Returns:
        the number of batches run.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 1):
        raise ValueError(f"batches: expected None or an int >= 1, got {batches!r}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    count = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for x in _input_batches(data):
            if batches is not None and count >= batches:
                break
            model(x.to(device) if device is not None else x)
            count += 1
        if count == 0:
            raise ValueError("data: expected at least one batch, got none")
    except BaseException:
        for m, mean, var, tracked in saved:  # leave the statistics as they were
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return count
