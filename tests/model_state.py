"""Test helper: everything a model-level call could change, captured and compared exactly.

    before = ModelState(model, optimizer)
    with pytest.raises(ValueError):
        prune_(model, float("nan"))
    before.assert_unchanged()

Independent of the library's own ``ModelSnapshot`` (a test that compared with the mechanism under
test could not fail when the mechanism is wrong): values are compared bit for bit (NaN equals
NaN, -0.0 differs from +0.0), and objects by identity.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from sparse_engine import sparse_modules
from sparse_engine.nn.mask_optimizer import installed_maskers


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape, device and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(a.detach().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def _hooks(obj) -> dict:
    return {k: list(v) for k, v in vars(obj).items() if k.endswith("_hooks") and isinstance(v, dict)}


class ModelState:
    """A copy of ``model``'s and ``optimizer``'s state (see :meth:`differences` for what is compared)."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        self.model, self.optimizer = model, optimizer
        self.params = {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
        self.grads = {n: (None if p.grad is None else p.grad.clone()) for n, (p, _) in self.params.items()}
        self.buffers = {n: (b, b.clone()) for n, b in model.named_buffers(remove_duplicate=False)}
        self.masks = {n: (m.mask_bits.clone(), m.mask_version) for n, m in sparse_modules(model)}
        self.modules = {n: (m, m.training, _hooks(m), sorted(vars(m))) for n, m in model.named_modules()}
        if optimizer is not None:
            self.state = {id(p): (p, {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()})
                          for p, s in optimizer.state.items()}
            self.groups = [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
                           for g in optimizer.param_groups]
            self.opt_hooks = _hooks(optimizer)
            self.maskers = [id(m) for m in installed_maskers(optimizer)]
            self.opt_attrs = sorted(vars(optimizer))

    def differences(self, allow_new_mask_versions: bool = True) -> list[str]:
        """What differs now: parameters (values, objects), gradients, buffers (masks included),
        mask versions (they may only increase, and only where ``allow_new_mask_versions``),
        module modes, hooks and attributes; the optimizer's state, param_groups, hooks, installed
        maskers and attributes."""
        diff = []
        model, now = self.model, dict(self.model.named_parameters(remove_duplicate=False))
        if list(now) != list(self.params):
            diff.append(f"parameter names {list(self.params)} -> {list(now)}")
        for n, (p, saved) in self.params.items():
            if now.get(n) is not p:
                diff.append(f"parameter {n}: a different object")
            if not same_bits(p.detach(), saved):
                diff.append(f"parameter {n}: values changed")
            grad = p.grad
            if (grad is None) != (self.grads[n] is None) or (grad is not None and not same_bits(grad, self.grads[n])):
                diff.append(f"parameter {n}: .grad changed")
        buffers = dict(model.named_buffers(remove_duplicate=False))
        if list(buffers) != list(self.buffers):
            diff.append(f"buffer names {list(self.buffers)} -> {list(buffers)}")
        for n, (b, saved) in self.buffers.items():
            if buffers.get(n) is not b or not same_bits(b, saved):
                diff.append(f"buffer {n}: changed")
        layers = dict(sparse_modules(model))
        for n, (bits, version) in self.masks.items():
            if n not in layers or not same_bits(layers[n].mask_bits, bits):
                diff.append(f"mask of {n}: changed")
            elif layers[n].mask_version < version or (layers[n].mask_version != version
                                                      and not allow_new_mask_versions):
                diff.append(f"mask_version of {n}: {version} -> {layers[n].mask_version}")
        modules = dict(model.named_modules())
        for n, (m, training, hooks, attrs) in self.modules.items():
            if modules.get(n) is not m:
                diff.append(f"module {n!r}: a different object")
            elif (m.training, _hooks(m), sorted(vars(m))) != (training, hooks, attrs):
                diff.append(f"module {n!r}: mode, hooks or attributes changed")
        if self.optimizer is not None:
            opt = self.optimizer
            state = {id(p): s for p, s in opt.state.items()}
            if sorted(state) != sorted(self.state):
                diff.append("optimizer state: parameters with state changed")
            for key, (p, saved) in self.state.items():
                s = state.get(key, {})
                if sorted(s) != sorted(saved):
                    diff.append(f"optimizer state of {tuple(p.shape)}: keys {sorted(saved)} -> {sorted(s)}")
                    continue
                for k, v in saved.items():
                    same = same_bits(s[k], v) if isinstance(v, Tensor) else s[k] == v
                    if not same:
                        diff.append(f"optimizer state of {tuple(p.shape)}: '{k}' changed")
            groups = [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
                      for g in opt.param_groups]
            if groups != self.groups:
                diff.append(f"optimizer param_groups: {self.groups} -> {groups}")
            if _hooks(opt) != self.opt_hooks:
                diff.append("optimizer hooks changed")
            if [id(m) for m in installed_maskers(opt)] != self.maskers:
                diff.append(f"installed mask_optimizers: {len(self.maskers)} -> {len(installed_maskers(opt))}")
            if sorted(vars(opt)) != self.opt_attrs:
                diff.append(f"optimizer attributes: {self.opt_attrs} -> {sorted(vars(opt))}")
        return diff

    def assert_unchanged(self, allow_new_mask_versions: bool = True) -> None:
        diff = self.differences(allow_new_mask_versions)
        assert not diff, "state changed: " + "; ".join(diff)
