"""The pruning methods a sweep file can name: one registry entry per method.

An entry (:class:`Method`) is a builder ``build(ctx, **options) -> pruner`` plus the schema of its
options (``{name: Field}``, checked and filled with defaults before anything runs). The pruner is
any object with ``step()`` (after every optimizer step), ``on_epoch_end()``, ``state_dict()`` and
``load_state_dict()``, as ``sparse_engine.pruning.Pruner`` has. :class:`MethodContext` gives the
builder what a trial knows: the sparse model and its optimizer on the device, the target, the
budget, the retraining LR schedule and the parent's original LR schedule, BatchNorm calibration
batches and a fixed batch for gradient scores.

Add a method with :func:`register_method` (in Python) or name a builder in the sweep file as
``package.module:function``: a function ``(ctx, **options)`` whose keyword parameters are its
options, or a :class:`Method` object.
"""
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from sparse_engine.pruning import FGGP, GMP, IMP, SET, Cyclical, OneShot, PruneAtInit, RigL
from sparse_engine.pruning.methods.dst import DECAYS
from sparse_engine.pruning.methods.lr_schedules import RETRAIN_SCHEDULES
from sparse_engine.pruning.select import ALLOCATIONS
from sparse_engine.sweep.fields import (REQUIRED, Field, Invalid, boolean, check_table, choice, import_path, integer,
                                        is_import_path, plain_value, real, string)
from sparse_engine.sweep.source import KeyPath, Problems

# Retraining LR schedules applied over the whole budget by the trial (IMP runs its own per phase).
TRIAL_LR_SCHEDULES = ("ft", "lrw", "slr", "clr", "llr", "constant")


@dataclass
class MethodContext:
    """What a method's builder gets (tensors on the trial's device).

    Attributes:
        model: the model with sparse layers (``sparsify``), loaded from the parent (or freshly
            initialised for methods with ``start="init"``).
        optimizer: its optimizer, with ``mask_optimizer`` installed.
        sparsity: the trial's target in [0, 1).
        epochs, steps_per_epoch, total_steps: the retraining budget.
        lr_schedule: the trial's retraining LR schedule name (``TRIAL_LR_SCHEDULES`` or IMP's).
        original_lrs: the parent's per-step learning rates (None without a parent).
        bn_data: BatchNorm recalibration batches (float32 ``(b, ...)`` tensors) or None.
        loss_fn: ``(logits, targets) -> scalar loss``.
        batch: a fixed training batch ``(inputs, targets)`` for gradient-based scores.
        parent_init: the parent's state_dict at initialisation (lottery tickets) or None.
        seed: the trial's seed.
        parent_snapshots: ``{step: state_dict}``, the parent's model after the optimizer steps its
            children's methods asked for (``Method.parent_steps``), or None.
    """
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sparsity: float
    epochs: int
    steps_per_epoch: int
    total_steps: int
    lr_schedule: str
    original_lrs: Optional[list]
    bn_data: Optional[list]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch: tuple
    parent_init: Optional[dict] = None
    seed: int = 0
    parent_snapshots: Optional[dict] = None

    def bn(self) -> dict:
        return {} if self.bn_data is None else {"bn_data": self.bn_data}

    def lr_options(self) -> dict:
        """What ``retrain_lr_schedule`` needs: the original schedule, or the optimizer's LR."""
        if self.original_lrs is not None:
            return {"original_schedule": self.original_lrs}
        return {"max_lr": self.optimizer.param_groups[0]["lr"]}


@dataclass(frozen=True)
class Method:
    """A registry entry: ``build(ctx, **options)`` and its options' schema.

    ``start``: "parent" (prune the trained dense parent) or "init" (prune at initialisation; no
    parent is trained). ``owns_lr``: the pruner schedules the learning rate itself (IMP restarts
    a schedule at every phase), so the trial adds none. ``parent_steps(options)``: ``{option name:
    step}``, the parent's optimizer steps (> 0) whose model state the method reads from
    ``MethodContext.parent_snapshots`` (the plan makes the parent save them); None: it reads none.
    ``late_options``: options added after sweeps were recorded with the method; at their default they
    are left out of the resolved config (the builder's own default applies), so those trials keep their ids.
    ``stackable(config)``: whether a trial of the method (its resolved config) may be trained with others
    in one stacked model (``sweep/stacked.py``) with the results it has alone; None: never. A method
    qualifies when its pruner runs unchanged on a stacked model's per-model view (``stack.pruning``; its
    draws from torch's global RNG come from the trial's own stream there).
    """
    build: Callable[..., Any]
    options: Mapping[str, Field] = field(default_factory=dict)
    start: str = "parent"
    owns_lr: bool = False
    doc: str = ""
    parent_steps: Optional[Callable[[dict], dict]] = None
    late_options: tuple = ()
    stackable: Optional[Callable[[dict], bool]] = None


def _scored_inputs(score: str, ctx: MethodContext) -> dict:
    """The inputs ``prune_`` reads for ``score``, taken from the context's fixed batch."""
    x, y = ctx.batch
    if score in ("gradient", "saliency", "grasp"):
        return {"loss_fn": ctx.loss_fn, "data": (x, y)}
    if score == "synflow":
        return {"input_shape": tuple(x.shape[1:])}
    if score == "wanda":
        return {"calib_data": x}
    return {}


def _gradual_steps(total: int, start: float, span: float, prunes: int) -> tuple[int, int, int]:
    """(start_step, end_step, frequency): up to ``prunes`` prunes over ``span`` of the budget."""
    start_step = int(start * total)
    steps = max(min(int(span * total), total - start_step), 1)
    prunes = min(prunes, steps)
    return start_step, start_step + (steps // prunes) * prunes, steps // prunes


SCORE = Field(choice("magnitude", "random", "gradient", "saliency", "grasp", "synflow", "wanda", "lamp"),
              "magnitude", "the pruning score")
ALLOCATION = Field(choice(*ALLOCATIONS), "global", "layer-wise allocation")
GRANULARITY = Field(string, "unstructured", "unstructured, N:M (e.g. 2:4) or BxB blocks")
GRADUAL = {"start": Field(real(0, 1, high_open=True), 0.0, "first prune, as a fraction of the budget"),
           "span": Field(real(0, 1, low_open=True), 0.75, "pruning period, as a fraction of the budget"),
           "prunes": Field(integer(1), 10, "number of prunes in the span"),
           "allocation": ALLOCATION}


def _one_shot(ctx: MethodContext, score, allocation, granularity, at):
    return OneShot(ctx.model, ctx.optimizer, ctx.sparsity, at=int(at * ctx.total_steps), total_steps=ctx.total_steps,
                   score=score, allocation=allocation, granularity=granularity, **_scored_inputs(score, ctx),
                   **ctx.bn())


def _imp(ctx: MethodContext, phases, score, allocation):
    # At most one phase per retraining epoch: the budget is split across phases in whole epochs.
    return IMP(ctx.model, ctx.optimizer, ctx.sparsity, min(phases, ctx.epochs), budget_epochs=ctx.epochs,
               steps_per_epoch=ctx.steps_per_epoch, lr_schedule=ctx.lr_schedule, lr_options=ctx.lr_options(),
               score=score, allocation=allocation, **_scored_inputs(score, ctx), **ctx.bn())


def _gmp(ctx: MethodContext, start, span, prunes, allocation, recover):
    t0, t1, dt = _gradual_steps(ctx.total_steps, start, span, prunes)
    regrowth = {"loss_fn": ctx.loss_fn, "data": ctx.batch} if recover else {}
    return GMP(ctx.model, ctx.optimizer, ctx.sparsity, t0, t1, dt, recover=recover, total_steps=ctx.total_steps,
               allocation=allocation, **regrowth, **ctx.bn())


def _fggp(ctx: MethodContext, start, span, prunes, allocation, rate):
    t0, t1, dt = _gradual_steps(ctx.total_steps, start, span, prunes)
    return FGGP(ctx.model, ctx.optimizer, ctx.sparsity, t0, t1, dt, rate, total_steps=ctx.total_steps,
                allocation=allocation, **ctx.bn())


def _cyclical(ctx: MethodContext, cycles, prunes_per_epoch, ramp, initial, allocation):
    # Each cycle needs a few steps to ramp: at most one cycle per 4 steps.
    cycles = max(1, min(cycles, ctx.total_steps // 4))
    regrowth = {"loss_fn": ctx.loss_fn, "data": ctx.batch} if initial > 0 else {}
    return Cyclical(ctx.model, ctx.optimizer, ctx.sparsity, cycles=cycles, total_steps=ctx.total_steps, ramp=ramp,
                    initial=initial, frequency=max(ctx.steps_per_epoch // prunes_per_epoch, 1),
                    allocation=allocation, **regrowth, **ctx.bn())


# Pruning at initialisation: the sweep file's score names -> prune_'s.
PAI_SCORES = {"snip": "saliency", "grasp": "grasp", "synflow": "synflow", "random": "random", "magnitude": "magnitude"}


def _pai(ctx: MethodContext, score, allocation, iterations, shuffle, reinit):
    name = PAI_SCORES[score]
    inputs = {**_scored_inputs(name, ctx), **({"iterations": iterations} if name == "synflow" else {})}
    return PruneAtInit(ctx.model, ctx.optimizer, ctx.sparsity, name, allocation, shuffle=shuffle, reinit=reinit,
                       **inputs)


def _lottery(ctx: MethodContext, phases, allocation, reinit, rewind_step=0):
    if rewind_step == 0:
        rewind = ctx.parent_init
        if rewind is None:
            raise ValueError("lottery: the dense parent's weights at initialisation (its model.pt 'init') are "
                             "missing; the ticket rewinds to them")
    else:
        saved = ctx.parent_snapshots or {}
        rewind = saved.get(rewind_step)
        if rewind is None:
            raise ValueError(f"lottery: rewind_step={rewind_step}: the dense parent saved no weights after step "
                             f"{rewind_step} (its model.pt 'snapshots' has steps {sorted(saved)}); the sweep plan "
                             f"makes a parent save the steps its tickets ask for")
    # IMP from the trained parent, every phase rewound to the parent's parameters and buffers at step
    # rewind_step (its initialisation for 0), the optimizer state cleared (IMP's weight rewinding: the
    # parent's momentum is not kept, as in open_lth); reinit: the random-reinitialisation control (the last
    # phase's kept weights drawn anew).
    return IMP(ctx.model, ctx.optimizer, ctx.sparsity, min(phases, ctx.epochs), budget_epochs=ctx.epochs,
               steps_per_epoch=ctx.steps_per_epoch, lr_schedule=ctx.lr_schedule, lr_options=ctx.lr_options(),
               rewind=rewind, reinit=reinit, score="magnitude", allocation=allocation, **ctx.bn())


def _set(ctx: MethodContext, delta_t, drop_fraction, decay, stop, allocation):
    return SET(ctx.model, ctx.optimizer, ctx.sparsity, ctx.total_steps, delta_t=delta_t,
               drop_fraction=drop_fraction, decay=decay, stop=stop, allocation=allocation)


def _rigl(ctx: MethodContext, delta_t, drop_fraction, decay, stop, allocation):
    # The dense gradient at update steps is taken on the context's fixed training batch.
    return RigL(ctx.model, ctx.optimizer, ctx.sparsity, ctx.total_steps, loss_fn=ctx.loss_fn, data=ctx.batch,
                delta_t=delta_t, drop_fraction=drop_fraction, decay=decay, stop=stop, allocation=allocation)


DST = {"delta_t": Field(integer(1), 100, "optimizer steps between drop-and-grow updates"),
       "drop_fraction": Field(real(0, 1), 0.3, "initial fraction of each layer's kept weights replaced per update"),
       "decay": Field(choice(*DECAYS), "cosine", "decay of the drop fraction to 0 at the stop step"),
       "stop": Field(real(0, 1, low_open=True), 0.75, "updates stop at this fraction of the budget"),
       "allocation": Field(choice(*ALLOCATIONS), "erk", "layer-wise allocation of the initial random masks")}

def _always(config: dict) -> bool:
    return True


METHODS: dict = {
    "one_shot": Method(_one_shot, {"score": SCORE, "allocation": ALLOCATION, "granularity": GRANULARITY,
                                   "at": Field(real(0, 1, high_open=True), 0.0, "prune step, fraction of budget")},
                       stackable=_always, doc="prune once (at the start by default), then retrain (OneShot)"),
    "imp": Method(_imp, {"phases": Field(integer(1), 3, "prune-retrain phases (at most one per epoch)"),
                         "score": SCORE, "allocation": ALLOCATION}, owns_lr=True,
                  stackable=_always,
                  doc="iterative magnitude pruning over the budget, LR schedule restarted per phase (IMP)"),
    "gmp": Method(_gmp, {**GRADUAL, "recover": Field(boolean, False, "regrow by the dense gradient")},
                  stackable=_always, doc="cubic gradual magnitude pruning (GMP)"),
    "fggp": Method(_fggp, {**GRADUAL, "rate": Field(real(1), 2.0, "candidates per pruned weight")},
                   stackable=_always, doc="cubic targets, gradient-first magnitude-next rule (FGGP)"),
    "cyclical": Method(_cyclical, {"cycles": Field(integer(1), 3, "cycles (at most one per 4 steps)"),
                                   "prunes_per_epoch": Field(integer(1), 4, "prunes per epoch within a cycle"),
                                   "ramp": Field(choice("cubic", "linear", "constant", "step"), "cubic"),
                                   "initial": Field(real(0, 1, high_open=True), 0.0, "sparsity at cycle starts"),
                                   "allocation": ALLOCATION},
                       stackable=_always,
                       doc="cubic ramps repeated over cycles, masks re-selected at each cycle start (Cyclical)"),
    "pai": Method(_pai, {"score": Field(choice(*PAI_SCORES), "snip", "the score at initialisation"),
                         "allocation": ALLOCATION,
                         "iterations": Field(integer(1), 100, "SynFlow's pruning rounds (read by synflow only)"),
                         "shuffle": Field(boolean, False, "sanity check: shuffle each layer's mask"),
                         "reinit": Field(boolean, False, "sanity check: re-draw the kept weights")},
                  start="init", stackable=_always,
                  doc="prune a fresh model at initialisation, then train it sparse (PruneAtInit)"),
    "lottery": Method(_lottery, {"phases": Field(integer(1), 1, "prune-rewind-retrain phases (at most one per epoch)"),
                                 "allocation": ALLOCATION,
                                 "reinit": Field(boolean, False, "the random-reinitialisation control"),
                                 "rewind_step": Field(integer(0), 0, "rewind to the parent's weights after this "
                                                                     "many optimizer steps (0: its initialisation; "
                                                                     "open_lth's rewinding_steps)")},
                      owns_lr=True, late_options=("rewind_step",), stackable=_always,
                      parent_steps=lambda options: {"rewind_step": options["rewind_step"]}
                      if options.get("rewind_step") else {},
                      doc="lottery ticket: magnitude mask of the trained parent, weights rewound to the parent's "
                          "initialisation or its step rewind_step, retrained (IMP with rewinding)"),
    "set": Method(_set, DST, start="init", stackable=_always,
                  doc="SET: dynamic sparse training from initialisation, random regrowth"),
    "rigl": Method(_rigl, DST, start="init", stackable=_always,
                   doc="RigL: dynamic sparse training from initialisation, regrowth by dense gradient magnitude"),
}


def register_method(name: str, method: Method, *, replace: bool = False) -> None:
    """Add ``method`` to the registry under ``name`` (sweep files then say ``name = "..."``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name: expected a non-empty name without ':', got {name!r}")
    if not isinstance(method, Method):
        raise TypeError(f"method: expected a sparse_engine.sweep.Method, got {type(method).__name__}")
    if name in METHODS and not replace:
        raise ValueError(f"name: method {name!r} is already registered (pass replace=True to replace it)")
    METHODS[name] = method


def import_object(path: str):
    """The object named by ``package.module:attribute``."""
    module, _, attr = import_path(path).partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise Invalid(f"cannot import module {module!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise Invalid(f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def signature_options(fn: Callable, skip: int) -> dict:
    """Fields for a function's keyword parameters after the first ``skip`` positional ones; a
    parameter without a default is required. None when it takes ``**kwargs`` (anything goes)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name: Field(plain_value, REQUIRED if p.default is p.empty else p.default)
            for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def lookup_method(name: str) -> Method:
    """The registry entry called ``name``, or the ``Method`` (or builder function) at an import path."""
    if not is_import_path(name):
        if name not in METHODS:
            raise Invalid(f"expected a method of the registry ({', '.join(sorted(METHODS))}) or "
                          f"'package.module:function', got {name!r}")
        return METHODS[name]
    obj = import_object(name)
    if isinstance(obj, Method):
        return obj
    if not callable(obj):
        raise Invalid(f"{name!r} is neither a sparse_engine.sweep.Method nor a callable (ctx, **options) -> pruner")
    return Method(obj, signature_options(obj, 1))


def resolve_method(values: Any, path: KeyPath, problems: Problems) -> Optional[dict]:
    """A method table of the sweep file -> ``{"name", "lr_schedule", "options"}`` with every
    option checked and defaulted, or None (problems recorded)."""
    base = check_table(values, {"name": Field(string, doc="a registry name or 'package.module:function'"),
                                "lr_schedule": Field(string, None)}, path, problems, allow_extra=True)
    if not base.ok:
        return None
    try:
        method = lookup_method(base.values["name"])
    except Invalid as e:
        problems.add(path + ("name",), str(e))
        return None
    schedule = base.values["lr_schedule"]
    allowed = RETRAIN_SCHEDULES if method.owns_lr else TRIAL_LR_SCHEDULES
    if schedule is not None and schedule not in allowed:
        problems.add(path + ("lr_schedule",), f"expected one of {', '.join(map(repr, allowed))}, got {schedule!r}")
        return None
    extra = base.values["__extra__"]
    if method.options is None:  # a builder taking **kwargs: any TOML values
        options, ok = {}, True
        for k, v in extra.items():
            try:
                options[k] = plain_value(v)
            except Invalid as e:
                problems.add(path + (k,), str(e))
                ok = False
    else:
        checked = check_table(extra, method.options, path, problems)
        options, ok = checked.values, checked.ok
        options = {k: v for k, v in options.items() if k not in method.late_options or v != method.options[k].default}
    if not ok:
        return None
    return {"name": base.values["name"], "lr_schedule": schedule, "options": options}
