"""A small training loop for the demo and for sweeps: ``train_epoch`` and ``evaluate``.

Any model and optimizer work; with sparse layers, pass the optimizer through
``sparse_engine.mask_optimizer`` first so pruned weights stay zero.
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, generator=None):
    """Mini-batches of in-memory tensors (the data sets here fit in memory)."""
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batch_size: int = 128, device: str = "cpu", scheduler=None, generator=None,
                progress: Optional[object] = None, on_step: Optional[Callable[[], object]] = None) -> float:
    """One pass over ``(x, y)`` with cross-entropy; returns the mean training loss.

    ``on_step`` runs after every ``optimizer.step()`` (and ``scheduler.step()``), before the next
    ``zero_grad``: pass a pruner's ``step`` so that it sees the step's gradients.
    """
    model.train()
    total, count = 0.0, 0
    for xb, yb in batches(x, y, batch_size, shuffle=True, generator=generator):
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        total += train_step(model, optimizer, xb, yb, scheduler, on_step) * xb.shape[0]
        count += xb.shape[0]
        if progress is not None:
            progress.update(1)
    return total / max(count, 1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, xb: torch.Tensor, yb: torch.Tensor,
               scheduler=None, on_step: Optional[Callable[[], object]] = None) -> float:
    """One optimizer step of ``train_epoch`` on the batch ``(xb, yb)``; returns its loss."""
    loss = F.cross_entropy(model(xb), yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if on_step is not None:
        on_step()
    return loss.item()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             device: str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``, in [0, 1]."""
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False):
        correct += (model(xb.to(device)).argmax(-1) == yb.to(device)).sum().item()
    return correct / max(x.shape[0], 1)
