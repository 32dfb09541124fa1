"""``Pruner``: what every pruning method of ``sparse_engine.pruning.methods`` shares.

A pruner drives the masks of a model's sparse layers from the user's own training loop::

    pruner = GMP(model, optimizer, 0.9, start_step=100, end_step=1000, frequency=100)
    for x, y in loader:
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()            # after optimizer.step(), before the next zero_grad
    pruner.on_epoch_end()        # after each epoch (IMP changes masks here)

Steps: ``t`` counts ``step()`` calls, i.e. optimizer steps; ``t = 0`` is the construction, and a
schedule's value for step ``t`` is applied right after the ``t``-th optimizer step (at the
construction for ``t = 0``). Masks change only through ``prune_``, and only at the method's
pruning steps.

Every pruner

* installs ``mask_optimizer(optimizer, model)`` unless one covering the model is already
  installed on ``optimizer``: the optimizer state of newly pruned weights is then cleared before
  the next step, and pruned weights are exact zeros after every step;
* recalibrates BatchNorm statistics after each prune when given ``bn_data``
  (``recalibrate_bn(model, bn_data, bn_batches)``);
* has ``state_dict()``/``load_state_dict()``: with the model's and the optimizer's state dicts
  (the masks travel in the model's), a run resumed from a checkpoint sets exactly the masks of the
  uninterrupted run. Resume by constructing the pruner as at the start (same arguments; the
  construction may prune the fresh model, which the loads then overwrite), then loading the
  model, optimizer and pruner state dicts, in any order;
* either completes its construction, ``step()``, ``on_epoch_end()`` and ``load_state_dict()``, or
  raises and leaves the model (weights, masks, buffers), the optimizer (state, ``param_groups``,
  hooks: no ``mask_optimizer`` is left installed by a failed construction) and the pruner's own
  counters as they were (``restore_on_error``; see ``Pruner`` for what a subclass does).
"""
import functools
import math
import numbers
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, Optional

import torch
from torch import Tensor, nn

from sparse_engine.nn.mask_optimizer import MaskedOptimizer, installed_maskers, mask_optimizer
from sparse_engine.nn.sparsify import sparse_modules
from sparse_engine.pruning.methods.bn_recalibration import recalibrate_bn
from sparse_engine.pruning.select import (INPUTS, gradient_scores, parse_granularity, prunable_layers, prune_,
                                          restore_on_error, target_kept)

# prune_ options that choose where the kept weights go; every pruner passes them through.
SELECTION_OPTIONS = ("allocation", "granularity", "exclude", "min_density")
# ... and, for methods that take any score, the score and its inputs.
SCORED_OPTIONS = ("score",) + SELECTION_OPTIONS + INPUTS


def installed_mask_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> Optional[MaskedOptimizer]:
    """The ``MaskedOptimizer`` installed on ``optimizer`` that covers every sparse-layer weight of
    ``model`` the optimizer holds, or None."""
    weights = {id(m.weight) for _, m in sparse_modules(model)}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]} & weights
    for owner in installed_maskers(optimizer):
        if held <= {id(p) for p, _ in owner.layers}:
            return owner
    return None


def ensure_mask_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> MaskedOptimizer:
    """The installed ``MaskedOptimizer`` of ``optimizer`` for ``model``, installing one if needed."""
    return installed_mask_optimizer(optimizer, model) or mask_optimizer(optimizer, model)


@torch.no_grad()
def regrowth_scores(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn, data,
                    names: Optional[list] = None) -> dict[str, Tensor]:
    """Scores under which pruned weights can regrow: ``|w|`` for kept weights and ``lr * |g|``
    for pruned ones, ``g`` the dense loss gradient at the current sparse weights on ``data``
    (``gradient_scores``) and ``lr`` the learning rate of the weight's param group.

    A pruned weight is an exact 0, so ``lr * |g|`` is the magnitude one SGD step would give it if
    it were regrown: keeping the largest scores is the projection step of projected gradient
    descent onto the sparsity constraint, ``w <- top_k(w - lr * g)`` (iterative hard
    thresholding; Srinivas et al. 2022 cast cyclical pruning as this time-varying projection).
    It needs no dense copy of the weights (as DPF, Lin et al. 2020, or AC/DC, Peste et al. 2021,
    keep), only one dense gradient, and among pruned weights it ranks by ``|g|``, RigL's growth
    criterion (Evci et al. 2020). With an adaptive optimizer ``lr * |g|`` is a proxy for the
    first step's size. Float32, the weights' shapes; weights outside ``optimizer`` use ``lr = 0``.
    """
    layers = dict(sparse_modules(model))
    if isinstance(names, (str, bytes)):
        raise TypeError(f"names: expected None or a list of sparse layer names, got {names!r}")
    names = list(layers) if names is None else list(names)
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lrs[id(p)] = group.get("lr")
    grads = gradient_scores(model, loss_fn=loss_fn, data=data, names=names)
    out = {}
    for n in names:
        w = layers[n].weight
        lr = lrs.get(id(w), 0.0)
        if lr is None:
            raise ValueError("optimizer: regrowth scores pruned weights by lr * |grad| and needs an 'lr' in every "
                             "param group")
        out[n] = torch.where(layers[n].mask, w.detach().abs().float(), float(lr) * grads[n])
    return out


def check_sparsity(value, name: str = "sparsity") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a target sparsity in [0, 1) (1.0 would prune every weight), got {value!r}")
    return float(value)


def check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _plain(value):
    """A comparable stand-in for a config value (callables by name, tensors by shape)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return f"<{type(value).__name__} {getattr(value, '__qualname__', '')}>".replace(" >", ">")


def _restores_on_error(init):
    """Wrap a pruner's ``__init__(self, model, optimizer, ...)`` so that a construction that raises
    leaves ``model`` and ``optimizer`` as they were (``restore_on_error``). Only the outermost
    constructor copies: a subclass's ``super().__init__`` runs inside it, and an error it raises
    propagates through it."""
    if getattr(init, "_restores_on_error", False):
        return init

    @functools.wraps(init)
    def __init__(self, model, optimizer, *args, **kwargs):
        if not isinstance(model, nn.Module) or vars(self).get("_constructing", False):
            return init(self, model, optimizer, *args, **kwargs)  # its own checks name the argument
        opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        self._constructing = True
        try:
            with restore_on_error(model, opt):
                init(self, model, optimizer, *args, **kwargs)
        finally:
            del self._constructing

    __init__._restores_on_error = True
    return __init__


class Pruner:
    """Base of the pruning methods (module docstring). Subclasses set ``self.config`` (the values
    that define the schedule, checked on ``load_state_dict``) and implement ``_on_step(t)`` /
    ``_on_epoch(e)``, returning True when they changed masks.

    Failing calls change nothing; what a subclass gets for free and what it does:

    * construction: every subclass's ``__init__`` is wrapped (``__init_subclass__``) so that a
      constructor that raises, wherever it raises (argument checks after ``super().__init__``
      installed ``mask_optimizer``, the first prune, BatchNorm recalibration, an LR scheduler),
      leaves the model and the optimizer as they were. Its signature must start with
      ``(self, model, optimizer, ...)``. Nothing to do;
    * ``step()``, ``on_epoch_end()``, ``load_state_dict()``: the pruner's attributes (counters,
      target, generator state) are restored when they raise. Nothing to do;
    * code of a subclass that changes the model in ``_on_step``/``_on_epoch`` runs inside
      ``with self.changing_model():`` (a copy of the model and optimizer, restored if the block
      raises). ``_prune`` and ``_regrow`` already do; a block whose only change is one ``prune_``
      call passes ``only_prune_=True`` and copies nothing (``prune_`` checks everything and
      computes every mask before it changes one), which keeps a pruning step free of copies.

    Attributes: ``step_count`` (optimizer steps seen), ``epoch`` (``on_epoch_end`` calls),
    ``sparsity`` (the target the masks were last pruned to; before the first prune, the measured
    sparsity of the pruned layers), ``layers`` (the ``(name, layer)`` pairs being pruned),
    ``masked_optimizer`` (the ``mask_optimizer`` handle).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _restores_on_error(cls.__dict__["__init__"])

    @_restores_on_error
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, prune_kwargs: dict, allowed: tuple,
                 bn_data=None, bn_batches: Optional[int] = None):
        name = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if not sparse_modules(model):
            raise ValueError(f"model: {name} prunes sparse layers and the model has none "
                             f"(call sparse_engine.sparsify(model) first)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        unknown = sorted(set(prune_kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"{name}: unexpected argument(s) {unknown}; the prune_ options it passes on are "
                            f"{list(allowed)}")
        if bn_batches is not None and bn_data is None:
            raise ValueError("bn_batches: given without bn_data (the batches to recalibrate BatchNorm on)")
        if bn_batches is not None:
            check_int(bn_batches, "bn_batches", 1)
        self.model = model
        self.optimizer = optimizer
        self.prune_kwargs = dict(prune_kwargs)
        self.unstructured = parse_granularity(self.prune_kwargs.get("granularity", "unstructured")).kind \
            == "unstructured"
        self.layers = prunable_layers(model, self.prune_kwargs.get("exclude"))
        self.numel = sum(m.weight.numel() for _, m in self.layers)
        self.bn_data, self.bn_batches = bn_data, bn_batches
        self.masked_optimizer = ensure_mask_optimizer(optimizer, model)
        self.generator = None
        if self.prune_kwargs.get("score") == "random":
            # Random scores draw from a generator the pruner owns (and checkpoints), seeded from
            # torch's global RNG: torch.manual_seed fixes the masks, and a resumed run continues
            # the same stream.
            if self.prune_kwargs.get("generator") is None:
                seed = int(torch.randint(0, 2 ** 62, ()))
                self.prune_kwargs["generator"] = torch.Generator().manual_seed(seed)
            self.generator = self.prune_kwargs["generator"]
        self.step_count = 0
        self.epoch = 0
        self.sparsity = self.current_sparsity()
        self.config: dict = {}

    # -- the hooks of the training loop -------------------------------------------------------

    def step(self) -> bool:
        """Call after each ``optimizer.step()``; prunes when the schedule says so. Returns True
        when masks changed."""
        with self._attributes_restored_on_error():
            self.step_count += 1
            return self._on_step(self.step_count)

    def on_epoch_end(self) -> bool:
        """Call after each training epoch; epoch-based methods (IMP) prune here. Returns True
        when masks changed."""
        with self._attributes_restored_on_error():
            self.epoch += 1
            return self._on_epoch(self.epoch)

    @contextmanager
    def _attributes_restored_on_error(self) -> Iterator[None]:
        saved = dict(vars(self))
        generator = self.generator.get_state() if self.generator is not None else None
        try:
            yield
        except BaseException:
            vars(self).clear()
            vars(self).update(saved)
            if generator is not None:
                self.generator.set_state(generator)
            raise

    def changing_model(self, only_prune_: bool = False) -> ContextManager:
        """Context manager around code that changes the model: if it raises, the model and the
        optimizer are as before (``restore_on_error(self.model, self.optimizer)``). With
        ``only_prune_=True`` (the block's one change is a ``prune_`` call) nothing is copied."""
        return nullcontext() if only_prune_ else restore_on_error(self.model, self.optimizer)

    def _on_step(self, t: int) -> bool:
        return False

    def _on_epoch(self, e: int) -> bool:
        return False

    def step_selects(self, t: int) -> bool:
        """Whether the ``step()`` call that counts step ``t`` may select masks (False: it surely does
        not). A stack of pruners (``sparse_engine.stack.pruning``) runs quiet steps without threads.
        Conservative here; the schedules of the built-in methods answer exactly."""
        return type(self)._on_step is not Pruner._on_step

    # -- pruning ------------------------------------------------------------------------------

    def kept(self) -> int:
        """Weights currently kept over the pruned layers."""
        return sum(int(m.mask.sum()) for _, m in self.layers)

    def current_sparsity(self) -> float:
        """Measured sparsity of the pruned layers: ``1 - kept / n``."""
        return 1.0 - self.kept() / self.numel

    def _prune(self, sparsity: float, **extra) -> bool:
        """``prune_`` to ``sparsity`` keeping pruned weights pruned; skipped (False) when an
        unstructured target keeps exactly the weights kept now (nothing to prune)."""
        self.sparsity = sparsity
        if self.unstructured and not self.prune_kwargs.get("regrow", False) \
                and target_kept(self.numel, sparsity) == self.kept():
            return False
        with self.changing_model(only_prune_=self.bn_data is None):  # BatchNorm recalibration can fail after it
            prune_(self.model, sparsity, **self.prune_kwargs, **extra)
            self._recalibrate()
        return True

    def _check_not_below(self, sparsity: float, name: str, hint: str) -> None:
        """Pruned weights stay pruned: a target that keeps more weights than are kept now is an error."""
        current = self.current_sparsity()
        below = target_kept(self.numel, sparsity) > self.kept() if self.unstructured else sparsity < current
        if below:
            raise ValueError(f"{name}={sparsity:g} is below the model's current sparsity {current:.6g} "
                             f"(over the pruned layers); {hint}")

    def _regrow(self, sparsity: float, loss_fn, data) -> bool:
        """``prune_`` to ``sparsity`` over all weights (``regrow=True``) by ``regrowth_scores``;
        at sparsity 0 every weight is kept and no gradient is needed."""
        self.sparsity = sparsity
        options = {k: v for k, v in self.prune_kwargs.items() if k in SELECTION_OPTIONS}
        if sparsity == 0.0:
            score = "magnitude"
        else:
            score = regrowth_scores(self.model, self.optimizer, loss_fn, data, [n for n, _ in self.layers])
        with self.changing_model(only_prune_=self.bn_data is None):
            prune_(self.model, sparsity, score, regrow=True, **options)
            self._recalibrate()
        return True

    def _recalibrate(self) -> None:
        if self.bn_data is not None:
            recalibrate_bn(self.model, self.bn_data, self.bn_batches)

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Counters, the current target, the method's config and its own state (plain values
        and tensors; ``torch.save``/``torch.load(weights_only=True)`` keep it)."""
        state = {"method": type(self).__name__, "config": _plain(self.config), "step_count": self.step_count,
                 "epoch": self.epoch, "sparsity": self.sparsity}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned, after checking it comes from the same method
        with the same config (a ValueError names the first differing entries). A state that
        fails to load leaves the pruner and the optimizer as they were."""
        with self._attributes_restored_on_error(), self.changing_model():
            self._load_state_dict(state)

    def _load_state_dict(self, state: dict) -> None:
        name = type(self).__name__
        if not isinstance(state, dict) or "method" not in state:
            raise TypeError(f"state: expected a dict from {name}.state_dict(), got {type(state).__name__}")
        if state["method"] != name:
            raise ValueError(f"state: saved by a {state['method']} pruner, cannot load into {name}")
        mine = _plain(self.config)
        if state["config"] != mine:
            diff = sorted(k for k in set(mine) | set(state["config"]) if mine.get(k) != state["config"].get(k))
            details = ", ".join(f"{k}: saved {state['config'].get(k)!r}, here {mine.get(k)!r}" for k in diff[:4])
            raise ValueError(f"state: saved by a {name} with a different config ({details})")
        self.step_count = state["step_count"]
        self.epoch = state["epoch"]
        self.sparsity = state["sparsity"]
        if self.generator is not None:
            self.generator.set_state(state["generator"])
        self._load_extra_state(state)

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        config = ", ".join(f"{k}={v!r}" for k, v in _plain(self.config).items())
        return f"{type(self).__name__}({config}; step={self.step_count}, epoch={self.epoch}, " \
               f"sparsity={self.sparsity:.4f})"
