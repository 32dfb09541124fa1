"""``mask_optimizer``: keep pruned weights exactly zero through any ``torch.optim`` optimizer.

Masked gradients are not enough: momentum buffers and Adam moments accumulated before a weight
was pruned keep moving it, and so would an optimizer that adds noise or decays towards a
non-zero point. Two hooks on the optimizer fix that:

* before each step, the optimizer state (every state tensor shaped like the weight: momentum,
  ``exp_avg``, ``exp_avg_sq``, ...) of layers whose mask changed since the last step is zeroed at
  the pruned positions, so the step starts clean;
* after each step, pruned weights are set to exact zeros, unless that is provably a no-op.

**When the post-step zeroing is skipped.** Sparse layers give an exact-zero weight gradient at
pruned positions; the pre-step hook has zeroed the state there; the weight is zero there. From a
zero gradient, zero state and zero weight, ``torch.optim.SGD`` (momentum, dampening, Nesterov,
weight decay, maximize) and ``torch.optim.Adam``/``AdamW`` (L2 or decoupled decay, amsgrad,
maximize; their update is ``lr * 0 / (sqrt(0) + eps)``) compute an update of exactly +0, in the
single-tensor, the ``foreach`` and the ``fused`` CPU implementations (``tests/test_mask_optimizer.py``
runs every flag combination for many steps without the zeroing and checks the pruned weights bit for
bit). So for those exact classes (not subclasses, which may change ``step``), with float
hyperparameters, ``eps > 0`` and ``fused`` only on CPU parameters, the zeroing is skipped: no per-step
work. Every other optimizer (Adagrad, RMSprop, a user's, the fused CUDA kernels, which the tests
cannot run here) keeps the guarantee through
:func:`sparse_engine.ops.apply_mask_`, which zeroes the pruned weights straight from the packed
bits in one pass (C++ on CPU, Triton on CUDA) without building a bool mask. The skip relies on the
layers' gradient contract: a weight that also gets gradients from outside its layer's forward
(``x @ layer.weight.T`` in user code) needs ``mask_optimizer(..., always_apply=True)``.
"""
import math
import numbers

import torch
from torch import nn

from sparse_engine.nn.sparsify import sparse_modules
from sparse_engine.ops.mask_pack import apply_mask_


# Attribute of the optimizer listing its MaskedOptimizer handles, so pruners can find them.
MASKERS_ATTR = "_sparse_engine_maskers"

# Optimizers whose update of a zero-gradient, zero-state, zero weight is +0 (module docstring),
# matched by exact class. Their group options that matter: "fused" (a different implementation,
# not covered by the proof), "eps" (0/(0+0) is NaN), and the scalars that multiply zeros (an
# infinite one gives NaN).
_ZERO_PRESERVING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
_SCALARS = ("lr", "momentum", "dampening", "weight_decay", "eps")


def _finite(v) -> bool:
    if type(v) is float or type(v) is int:  # the common case, without the ABC check
        return math.isfinite(v)
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def update_keeps_zeros(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """True when ``optimizer``'s step provably leaves a weight of ``group`` at +0 where its gradient,
    its state and the weight are zero (so ``mask_optimizer``'s post-step zeroing would change nothing)."""
    if type(optimizer) not in _ZERO_PRESERVING:
        return False
    if group.get("fused") and any(p.device.type != "cpu" for p in group["params"]):
        return False  # the fused CUDA kernels: not covered by the tests, which run on CPU
    if not all(_finite(group[k]) for k in _SCALARS if k in group):
        return False  # a tensor lr (capturable, differentiable) or an infinite scalar
    if "betas" in group and not all(_finite(b) for b in group["betas"]):
        return False
    return "eps" not in group or group["eps"] > 0


class MaskedOptimizer:
    """Handle returned by :func:`mask_optimizer`; ``remove()`` detaches the hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, always_apply: bool = False):
        layers = {id(m.weight): m for _, m in sparse_modules(model)}
        if not layers:
            raise ValueError("model: expected a model with sparse layers (call sparse_engine.sparsify first), "
                             "found none")
        self.optimizer = optimizer
        self.always_apply = always_apply
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
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    self._zero_pruned(value, layer)

    @staticmethod
    def _zero_pruned(value: torch.Tensor, layer) -> None:
        """Zero ``value`` (a state tensor of ``layer``'s weight) at the layer's pruned positions."""
        apply_mask_(value, layer.mask_bits)

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the pruned weights of every layer (from the packed bits)."""
        for _, layer in self.layers:
            layer.apply_mask_()

    def layers_to_apply(self) -> list:
        """The layers whose pruned weights the post-step hook zeroes: all with ``always_apply``, else
        those in param groups where :func:`update_keeps_zeros` does not hold. Read at every step, so a
        group changed after installation is judged as it is now."""
        if self.always_apply:
            return [layer for _, layer in self.layers]
        groups = self.optimizer.param_groups
        if len(groups) == 1:  # every layer is in it: no set to build on every step
            return [] if update_keeps_zeros(self.optimizer, groups[0]) else [layer for _, layer in self.layers]
        unproven = {id(p) for group in self.optimizer.param_groups if not update_keeps_zeros(self.optimizer, group)
                    for p in group["params"]}
        return [layer for p, layer in self.layers if id(p) in unproven]

    def _before_step(self, optimizer, args, kwargs):
        self.clear_state()

    @torch.no_grad()
    def _after_step(self, optimizer, args, kwargs):
        for layer in self.layers_to_apply():
            layer.apply_mask_()

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


def mask_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module,
                   always_apply: bool = False) -> MaskedOptimizer:
    """Keep the pruned weights of ``model``'s sparse layers exactly zero across ``optimizer`` steps.

    Call once after building the optimizer; masks may change any time afterwards (``set_mask``,
    pruning methods), and the optimizer state of newly pruned entries is cleared before the next
    step. The post-step zeroing is skipped where it provably changes nothing (module docstring);
    ``always_apply=True`` runs it after every step regardless (for weights that also get gradients
    from outside their layer). Returns a handle whose ``remove()`` undoes it.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(always_apply, bool):
        raise TypeError(f"always_apply: expected a bool, got {type(always_apply).__name__}")
    return MaskedOptimizer(optimizer, model, always_apply)
