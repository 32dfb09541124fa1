"""``mask_optimizer``: keep pruned weights exactly zero through any ``torch.optim`` optimizer.

Masked gradients are not enough: momentum buffers and Adam moments accumulated before a weight
was pruned keep moving it, and so would an optimizer that adds noise or decays towards a
non-zero point. Two hooks on the optimizer fix that:

* before each step, the optimizer state (every state tensor shaped like the weight: momentum,
  ``exp_avg``, ``exp_avg_sq``, ...) of layers whose mask changed since the last step is zeroed at
  the pruned positions, so the step starts clean;
* after each step, pruned weights are set to exact zeros.

With sparse layers the weight gradient is already zero at pruned positions, so for SGD (with
momentum, Nesterov, weight decay), Adam and AdamW the post-step zeroing changes nothing; it is the
guarantee for every other optimizer.
"""
import torch
from torch import nn

from sparse_engine.nn.sparsify import sparse_modules


# Attribute of the optimizer listing its MaskedOptimizer handles, so pruners can find them.
MASKERS_ATTR = "_sparse_engine_maskers"


class MaskedOptimizer:
    """Handle returned by :func:`mask_optimizer`; ``remove()`` detaches the hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        layers = {id(m.weight): m for _, m in sparse_modules(model)}
        if not layers:
            raise ValueError("model: expected a model with sparse layers (call sparse_engine.sparsify first), "
                             "found none")
        self.optimizer = optimizer
        self.layers = [(p, layers[id(p)]) for group in optimizer.param_groups for p in group["params"]
                       if id(p) in layers]
        if not self.layers:
            raise ValueError("optimizer: none of its parameters is the weight of a sparse layer of model")
        self._versions = {id(p): None for p, _ in self.layers}
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]
        maskers = getattr(optimizer, MASKERS_ATTR, None)
        if maskers is None:
            maskers = []
            setattr(optimizer, MASKERS_ATTR, maskers)
        maskers.append(self)

    @torch.no_grad()
    def clear_state(self, force: bool = False) -> None:
        """Zero the optimizer state at pruned positions of layers whose mask changed (all if ``force``)."""
        for p, layer in self.layers:
            if not force and self._versions[id(p)] == layer.mask_version:
                continue
            self._versions[id(p)] = layer.mask_version
            state = self.optimizer.state.get(p)
            if not state:
                continue
            pruned = ~layer.mask
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.masked_fill_(pruned, 0)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for _, layer in self.layers:
            layer.apply_mask_()

    def _before_step(self, optimizer, args, kwargs):
        self.clear_state()

    def _after_step(self, optimizer, args, kwargs):
        self.apply_masks()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        maskers = getattr(self.optimizer, MASKERS_ATTR, [])
        if self in maskers:
            maskers.remove(self)


def installed_maskers(optimizer: torch.optim.Optimizer) -> list["MaskedOptimizer"]:
    """The active ``MaskedOptimizer`` handles installed on ``optimizer`` by :func:`mask_optimizer`."""
    return list(getattr(optimizer, MASKERS_ATTR, []))


def mask_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> MaskedOptimizer:
    """Keep the pruned weights of ``model``'s sparse layers exactly zero across ``optimizer`` steps.

    Call once after building the optimizer; masks may change any time afterwards (``set_mask``,
    pruning methods), and the optimizer state of newly pruned entries is cleared before the next
    step. Returns a handle whose ``remove()`` undoes it.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return MaskedOptimizer(optimizer, model)
