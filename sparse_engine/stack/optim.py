"""Per-model optimisation of a stacked model: SGD and AdamW with one learning rate per model, per-model LR
schedules, and optimizer-state masking per model.

A stacked Parameter ``(K, ...)`` holds K models' tensors, so an optimizer whose hyperparameters are
length-K tensors (broadcast along the model axis) performs K independent updates in one
element-wise pass. :class:`StackedSGD` and :class:`StackedAdamW` follow ``torch.optim.SGD`` and
``torch.optim.AdamW`` (their single-tensor algorithms) step for step, with ``lr`` and
``weight_decay`` per model; every state tensor has the parameter's shape, so model k's state is
slice ``[k]``. :class:`PerModelLR` drives each model's learning rate by its own ordinary
``LRScheduler`` (``StepLR``, the retraining schedules of ``sparse_engine.pruning.methods``...), and
:func:`mask_stacked_optimizer` does what ``mask_optimizer`` does for each model's masks.
"""
import functools
import math
import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from sparse_engine.nn.mask_optimizer import MaskedOptimizer
from sparse_engine.stack.convert import StackedModel

PerModel = Union[float, Sequence[float], Tensor]


def _per_model(value: PerModel, name: str, num_models: int) -> Tensor:
    """A length-K float64 CPU tensor from a float (the same for every model) or K values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * num_models
    elif isinstance(value, (Sequence, Tensor)) and not isinstance(value, (str, bytes)):
        values = [float(v) for v in (value.tolist() if isinstance(value, Tensor) else value)]
    else:
        raise TypeError(f"{name}: expected a float or one float per model, got {type(value).__name__}")
    if len(values) != num_models:
        raise ValueError(f"{name}: expected {num_models} values (one per model), got {len(values)}")
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError(f"{name}: expected finite values >= 0, got {values}")
    return torch.tensor(values, dtype=torch.float64)


def _num_models(params: list) -> int:
    shapes = [p.shape for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not shapes or any(len(s) == 0 for s in shapes):
        raise ValueError("params: expected stacked parameters, each with a leading model axis")
    k = shapes[0][0]
    if any(s[0] != k for s in shapes):
        raise ValueError(f"params: expected every parameter to have the same leading model axis, got "
                         f"{sorted({s[0] for s in shapes})}")
    return k


class _StackedOptimizer(Optimizer):
    per_model = ("lr", "weight_decay")

    def __init__(self, params, defaults: dict):
        if isinstance(params, StackedModel):
            params = params.parameters()
        params = list(params)
        self.num_models = _num_models(params)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for key in self.per_model:
                group[key] = _per_model(group[key], key, self.num_models)
            for p in group["params"]:
                if p.shape[0] != self.num_models:
                    raise ValueError(f"params: expected a leading model axis of {self.num_models}, "
                                     f"got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Callable = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self._update(p, g)
        return loss

    def _update(self, p: Tensor, g: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def _view(values: Tensor, p: Tensor) -> Tensor:
        return values.to(device=p.device, dtype=p.dtype).view(-1, *([1] * (p.dim() - 1)))


class StackedSGD(_StackedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) with ``lr`` and ``weight_decay`` per model.

    Args:
        params: a :class:`StackedModel`, or its parameters / param groups (every tensor ``(K, ...)``).
        lr, weight_decay: a float for every model, or K values.
    """

    def __init__(self, params, lr: PerModel, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: PerModel = 0.0, nesterov: bool = False):
        if momentum < 0:
            raise ValueError(f"momentum: expected a value >= 0, got {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov: requires a momentum > 0 and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _update(self, p: Tensor, g: dict) -> None:
        d_p = p.grad
        if g["weight_decay"].any():
            d_p = d_p + self._view(g["weight_decay"], p) * p
        if g["momentum"] != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.detach().clone()
            else:
                buf.mul_(g["momentum"]).add_(d_p, alpha=1 - g["dampening"])
            d_p = d_p.add(buf, alpha=g["momentum"]) if g["nesterov"] else buf
        p.addcmul_(self._view(g["lr"], p), d_p, value=-1)  # one pass, no lr * d_p temporary


@functools.lru_cache(maxsize=8)
def _bias_corrections(steps: tuple, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """AdamW's ``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per model (float64, read only), in Python floats as
    torch's single-tensor AdamW computes them; computed once per step for all the parameters."""
    return (torch.tensor([1 - beta1 ** t for t in steps], dtype=torch.float64),
            torch.tensor([math.sqrt(1 - beta2 ** t) for t in steps], dtype=torch.float64))


class StackedAdamW(_StackedOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, no amsgrad) with ``lr`` and ``weight_decay`` per model."""

    def __init__(self, params, lr: PerModel = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: PerModel = 1e-2):
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas: expected two values in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"eps: expected a value >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():
            self._per_model_step(state)

    def _per_model_step(self, state: dict) -> None:
        """One step count per model (torch's float32 format, model k's at [k]), also from a state saved
        with one count for all: a model whose state is cleared (IMP rewinding) restarts its bias
        corrections, as a fresh torch AdamW does."""
        step = state.get("step")
        if step is None or step.dim() == 0:
            state["step"] = torch.full((self.num_models,), 0.0 if step is None else float(step), dtype=torch.float32)

    def _update(self, p: Tensor, g: dict) -> None:
        beta1, beta2 = g["betas"]
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._per_model_step(state)
        state["step"] += 1
        correction1, correction2_sqrt = _bias_corrections(tuple(state["step"].tolist()), beta1, beta2)
        lr = self._view(g["lr"], p)
        p.mul_(1 - lr * self._view(g["weight_decay"], p))
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / self._view(correction2_sqrt, p)).add_(g["eps"])
        p.sub_(lr / self._view(correction1, p) * (state["exp_avg"] / denom))


class PerModelLR:
    """Each model's learning rate driven by its own ``torch.optim.lr_scheduler.LRScheduler``.

    ``schedulers[k]`` is a function ``optimizer -> LRScheduler``; it is called with a stand-in
    optimizer holding model k's learning rates (one param group per group of ``optimizer``), so
    any scheduler works unchanged; or None: model k's learning rates are left as they are (a
    constant LR, or one its pruner sets). ``step()`` steps the schedulers and writes their learning
    rates into ``optimizer``'s per-model ``lr`` tensors. ``state_dict``/``load_state_dict`` resume
    exactly; ``load_model_state(k, ...)`` sets one model's.
    """

    def __init__(self, optimizer: _StackedOptimizer, schedulers: Sequence[Callable[[Optimizer], object]]):
        if not isinstance(optimizer, _StackedOptimizer):
            raise TypeError(f"optimizer: expected a StackedSGD or StackedAdamW, got {type(optimizer).__name__}")
        schedulers = list(schedulers)
        if len(schedulers) != optimizer.num_models:
            raise ValueError(f"schedulers: expected {optimizer.num_models} (one per model), got {len(schedulers)}")
        self.optimizer = optimizer
        self.stand_ins = [torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": float(g["lr"][k])}
                                           for g in optimizer.param_groups]) for k in range(optimizer.num_models)]
        self.schedulers = [None if make is None else make(o) for make, o in zip(schedulers, self.stand_ins)]
        self._sync()

    def _sync(self) -> None:
        for i, g in enumerate(self.optimizer.param_groups):
            lr = g["lr"].tolist()
            for k, (o, s) in enumerate(zip(self.stand_ins, self.schedulers)):
                if s is not None:
                    lr[k] = o.param_groups[i]["lr"]
            g["lr"] = torch.tensor(lr, dtype=torch.float64)

    def load_model_state(self, k: int, state: Optional[dict], lrs: Sequence[float]) -> None:
        """Model ``k``'s scheduler state (its ``state_dict()``, None without a scheduler) and its learning
        rates, one per param group, as a checkpoint of that model alone holds them."""
        if self.schedulers[k] is not None:
            self.schedulers[k].load_state_dict(state)
        for i, (g, lr) in enumerate(zip(self.stand_ins[k].param_groups, lrs)):
            g["lr"] = lr
            self.optimizer.param_groups[i]["lr"][k] = lr

    def step(self) -> None:
        with warnings.catch_warnings():
            # the stand-ins never step themselves, which torch's schedulers would warn about
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            for s in self.schedulers:
                if s is not None:
                    s.step()
        self._sync()

    def state_dict(self) -> dict:
        return {"schedulers": [None if s is None else s.state_dict() for s in self.schedulers],
                "lrs": [[g["lr"] for g in o.param_groups] for o in self.stand_ins]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.schedulers, state["schedulers"]):
            if s is not None:
                s.load_state_dict(st)
        for o, lrs in zip(self.stand_ins, state["lrs"]):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr
        self._sync()


class StackedMaskedOptimizer(MaskedOptimizer):
    """``MaskedOptimizer`` over the per-model masks of a stacked model's masked layers (the handle of
    :func:`mask_stacked_optimizer`): before each step the state of entries newly pruned in any model is
    zeroed; after it, with ``zero_after_step``, every model's pruned weights are set to zero."""

    def __init__(self, optimizer: Optimizer, stacked: StackedModel, zero_after_step: bool = True):
        self.zero_after_step = zero_after_step
        # the parent's __init__ finds sparse layers with sparse_modules; here the units are stacked layers
        layers = {id(u.weight): u for _, u in stacked.masked_units()}
        if not layers:
            raise ValueError("stacked: expected a stacked model with masked layers, found none")
        self.optimizer = optimizer
        self.layers = [(p, layers[id(p)]) for g in optimizer.param_groups for p in g["params"] if id(p) in layers]
        if not self.layers:
            raise ValueError("optimizer: none of its parameters is the weight of a masked layer of stacked")
        self._versions = {id(p): None for p, _ in self.layers}
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    @staticmethod
    def _zero_pruned(value: Tensor, unit) -> None:
        value.masked_fill_(~unit.mask, 0)  # stacked bits: one mask per model

    def _after_step(self, optimizer, args, kwargs):
        if self.zero_after_step:
            self.apply_masks()


def mask_stacked_optimizer(optimizer: Optimizer, stacked: StackedModel,
                           zero_after_step: Optional[bool] = None) -> StackedMaskedOptimizer:
    """``mask_optimizer`` for a stacked model: keeps each model's pruned weights and their optimizer state
    exactly zero across ``optimizer`` steps (any optimizer over ``stacked``'s parameters).

    ``zero_after_step`` (default: True except for ``StackedSGD``/``StackedAdamW``): zero the pruned weights
    after every step. The stacked optimizers' update is exactly zero at pruned positions (the stacked
    layers' weight gradient is an exact zero there, the state there is cleared when a mask changes, and
    weight decay of a zero weight is zero), so for them the pass over every weight is skipped.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(stacked, StackedModel):
        raise TypeError(f"stacked: expected a StackedModel, got {type(stacked).__name__}")
    if zero_after_step is None:
        zero_after_step = not isinstance(optimizer, _StackedOptimizer)
    return StackedMaskedOptimizer(optimizer, stacked, bool(zero_after_step))
