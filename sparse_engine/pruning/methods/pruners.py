"""Pruning methods: objects that change a model's masks at the right times of a training run.

    pruner = IMP(model, optimizer, 0.9, phases=3, epochs_per_phase=2, lr_schedule="llr",
                 steps_per_epoch=len(loader), lr_options={"max_lr": 0.1})
    for epoch in range(pruner.total_epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            pruner.step()         # counts steps (and steps IMP's LR schedule)
        pruner.on_epoch_end()     # IMP prunes here at the end of each phase

Each method reads its targets from ``sparse_engine.pruning.methods.schedules`` and changes masks only
through ``prune_``; the shared machinery (step counting, ``mask_optimizer``, BatchNorm
recalibration, checkpointing) is ``sparse_engine.pruning.pruner.Pruner``; IMP, with its phases,
retraining LR schedules and rewinding, lives in ``sparse_engine.pruning.methods.imp``. Step ``t`` counts
optimizer steps; the schedule's value at ``t`` is applied after the ``t``-th optimizer step, and
at the construction for ``t = 0``.

=========  ==================  ===========================================================
method     masks change        selection
=========  ==================  ===========================================================
OneShot    step ``at``         any ``prune_`` score/allocation/granularity
IMP        each phase start    any ``prune_`` score; pruned weights stay pruned
GMP        every ``frequency`` magnitude; ``recover=True``: over all weights by
           steps, cubic        ``regrowth_scores`` (pruned weights can come back)
Cyclical   cycle starts +      magnitude within a cycle; at each cycle start over all
           every ``frequency`` weights by ``regrowth_scores``
FGGP       every ``frequency`` ``prune_``'s "fggp" rule, gradients from ``.grad``
           steps, cubic
=========  ==================  ===========================================================
"""
import numbers
from typing import Callable, Optional

from sparse_engine.pruning.methods.imp import IMP
from sparse_engine.pruning.methods.pruner import SCORED_OPTIONS, SELECTION_OPTIONS, Pruner, check_int, check_sparsity
from sparse_engine.pruning.methods.schedules import (cubic_sparsity, cycle_index, cycle_start, cyclical_sparsity,
                                             one_shot_sparsity)

__all__ = ["OneShot", "IMP", "GMP", "FGGP", "Cyclical"]


def _regrowth_inputs(loss_fn, data, needed: bool, why: str) -> None:
    if needed and (loss_fn is None or data is None):
        raise ValueError(f"{why}: pruned weights regrow by the dense gradient (regrowth_scores), so loss_fn and data "
                         f"are needed (a batch (inputs, targets) or a list of batches)")
    if not needed and (loss_fn is not None or data is not None):
        raise ValueError(f"loss_fn/data: only read when pruned weights can regrow ({why}); got them without it")


class OneShot(Pruner):
    """One-shot pruning then retraining (Han et al. 2015, "Learning both Weights and Connections
    for Efficient Neural Networks"): ``s_t = 0`` before step ``at``, ``sparsity`` from it on
    (``one_shot_sparsity``); the whole target is pruned once, at the construction when ``at=0``,
    and the rest of training retrains the sparse network.

    Args:
        model, optimizer: the model with sparse layers and its optimizer.
        sparsity: target in [0, 1).
        at: the step at which to prune (0: now).
        total_steps: the training length, if known; ``at > total_steps`` is then an error.
        bn_data, bn_batches: recalibrate BatchNorm after the prune (``recalibrate_bn``).
        **prune_kwargs: ``prune_``'s ``score``, ``allocation``, ``granularity``, ``exclude``,
            ``min_density``, ``regrow`` and the score's inputs (``loss_fn``, ``data``, ...).
            With ``score="random"`` the pruner owns (and checkpoints) the generator.
    """

    def __init__(self, model, optimizer, sparsity: float, *, at: int = 0, total_steps: Optional[int] = None,
                 bn_data=None, bn_batches: Optional[int] = None, **prune_kwargs):
        target = check_sparsity(sparsity)
        at = check_int(at, "at", 0)
        one_shot_sparsity(0, target, at, total_steps=total_steps)
        super().__init__(model, optimizer, prune_kwargs, SCORED_OPTIONS + ("regrow",), bn_data, bn_batches)
        if not self.prune_kwargs.get("regrow", False):
            self._check_not_below(target, "sparsity", "pruned weights stay pruned (pass regrow=True to re-select)")
        self.target, self.at = target, at
        self.config = {"sparsity": target, "at": at, "total_steps": total_steps, **self.prune_kwargs}
        if at == 0:
            self._prune(target)

    def _on_step(self, t: int) -> bool:
        return self._prune(one_shot_sparsity(t, self.target, self.at)) if t == self.at else False

    def step_selects(self, t: int) -> bool:
        return t == self.at


class _Gradual(Pruner):
    """GMP and FGGP: ``cubic_sparsity`` targets at ``t = t0 + k dt``, ``k = 0..n``, with
    ``t0 = start_step``, ``dt = frequency``, ``n = (end_step - start_step) / frequency``."""

    def __init__(self, model, optimizer, sparsity, start_step, end_step, frequency, initial, total_steps,
                 prune_kwargs, allowed, bn_data, bn_batches, can_regrow: bool):
        final = check_sparsity(sparsity)
        start = check_int(start_step, "start_step", 0)
        if isinstance(end_step, bool) or not isinstance(end_step, numbers.Integral) or end_step <= start:
            raise ValueError(f"end_step: expected an int > start_step={start}, got {end_step!r}")
        dt = check_int(frequency, "frequency", 1)
        if (end_step - start) % dt:
            below = start + dt * ((end_step - start) // dt)
            raise ValueError(f"frequency={dt}: end_step - start_step = {end_step - start} must be a multiple of it "
                             f"(the last pruning step is end_step), e.g. end_step={below} or {below + dt}")
        n = (end_step - start) // dt
        super().__init__(model, optimizer, prune_kwargs, allowed, bn_data, bn_batches)
        if initial is None:
            initial = self.sparsity
        else:
            initial = check_sparsity(initial, "initial")
            if not can_regrow:
                self._check_not_below(initial, "initial", "pruned weights stay pruned (initial=None starts from it)")
        if initial > final:
            raise ValueError(f"initial={initial:g}: expected at most sparsity={final:g}")
        cubic_sparsity(start, initial, final, start, dt, n, total_steps=total_steps)  # checks the end
        self.initial, self.final, self.t0, self.dt, self.n = initial, final, start, dt, n
        self.config = {"sparsity": final, "initial": initial, "start_step": start, "end_step": int(end_step),
                       "frequency": dt, "total_steps": total_steps, **self.prune_kwargs}

    def target_at(self, t: int) -> float:
        """Zhu & Gupta's ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3`` (``cubic_sparsity``)."""
        return cubic_sparsity(t, self.initial, self.final, self.t0, self.dt, self.n)

    def pruning_step(self, t: int) -> bool:
        return self.t0 <= t <= self.t0 + self.n * self.dt and (t - self.t0) % self.dt == 0

    def _on_step(self, t: int) -> bool:
        return self._apply(self.target_at(t)) if self.pruning_step(t) else False

    def step_selects(self, t: int) -> bool:
        return self.pruning_step(t)

    def _apply(self, sparsity: float) -> bool:
        raise NotImplementedError


class GMP(_Gradual):
    """Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune"): every
    ``frequency`` steps from ``start_step`` to ``end_step``, prune to

        s_t = s_f + (s_i - s_f) (1 - (t - start_step) / (end_step - start_step))^3

    (``cubic_sparsity``; ``s_i = initial``, default the model's current sparsity, ``s_f =
    sparsity``). ``end_step - start_step`` must be a multiple of ``frequency``; a pruning step at
    ``t = 0`` happens at the construction.

    ``recover=False`` (Zhu & Gupta): the smallest ``|w|`` among the kept weights are pruned;
    pruned weights stay pruned. ``recover=True``: at each pruning step the masks are recomputed
    over all weights (``regrow=True``) by ``regrowth_scores`` (``|w|`` kept, ``lr * |g|`` pruned,
    ``g`` the dense gradient on ``loss_fn``/``data``), so a pruned weight whose one-step update
    would outweigh a kept weight comes back (at 0; it then trains). Sparse layers keep no dense
    copy of pruned weights, so recovery by a dense shadow (DPF, Lin et al. 2020) is not possible;
    this is its one-step, copy-free form (module ``pruner``).

    Args:
        total_steps: the training length, if known; a schedule ending after it is an error.
        loss_fn, data: the gradient source of ``recover=True`` (required then, unused otherwise).
        **prune_kwargs: ``allocation``, ``granularity``, ``exclude``, ``min_density``.
    """

    def __init__(self, model, optimizer, sparsity: float, start_step: int, end_step: int, frequency: int, *,
                 initial: Optional[float] = None, recover: bool = False, total_steps: Optional[int] = None,
                 loss_fn: Optional[Callable] = None, data=None, bn_data=None, bn_batches: Optional[int] = None,
                 **prune_kwargs):
        if not isinstance(recover, bool):
            raise TypeError(f"recover: expected a bool, got {type(recover).__name__}")
        _regrowth_inputs(loss_fn, data, recover, "recover=True")
        super().__init__(model, optimizer, sparsity, start_step, end_step, frequency, initial, total_steps,
                         prune_kwargs, SELECTION_OPTIONS, bn_data, bn_batches, can_regrow=recover)
        self.recover, self.loss_fn, self.data = recover, loss_fn, data
        self.config["recover"] = recover
        if self.pruning_step(0):
            self._apply(self.target_at(0))

    def _apply(self, sparsity: float) -> bool:
        if self.recover:
            return self._regrow(sparsity, self.loss_fn, self.data)
        return self._prune(sparsity)


class FGGP(_Gradual):
    """FGGP, fixed-rate gradient-first gradual pruning (Zhu, Bezek and Goksel 2024): GMP's cubic
    targets (``cubic_sparsity``, from ``initial``: default the current sparsity, e.g. dense or
    50%-sparse), and at each pruning step ``prune_(..., score="fggp", rate=rate)``: the
    ``round(rate * p)`` kept weights with the smallest ``|grad|`` are candidates and the ``p``
    smallest-``|w|`` candidates are pruned (``fggp_keep_scores``).

    Gradient source: the weights' ``.grad`` at the time of ``step()``, i.e. the current
    mini-batch's gradient. Call ``step()`` after ``optimizer.step()`` and before the next
    ``zero_grad()`` (as ``sparse_engine.train.train_epoch`` orders them: it zeroes the gradients
    at the start of each iteration). A sparse layer's ``.grad`` is exact on kept weights, the only
    ones FGGP ranks. Or pass ``loss_fn`` and ``data`` to compute it on a fixed batch (needed for a
    pruning step at ``t = 0``, where there is no ``.grad`` yet, unless ``initial`` is the current
    sparsity, in which case that step has nothing to prune).

    Args:
        rate: candidates per weight to prune (a number >= 1).
        **prune_kwargs: ``allocation``, ``exclude``, ``min_density`` (FGGP is unstructured).
    """

    def __init__(self, model, optimizer, sparsity: float, start_step: int, end_step: int, frequency: int,
                 rate: float, *, initial: Optional[float] = None, total_steps: Optional[int] = None,
                 loss_fn: Optional[Callable] = None, data=None, bn_data=None, bn_batches: Optional[int] = None,
                 **prune_kwargs):
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 1.0 <= rate < float("inf"):
            raise ValueError(f"rate: expected a finite number >= 1 (candidates per weight to prune), got {rate!r}")
        if (loss_fn is None) != (data is None):
            raise ValueError("loss_fn/data: give both (gradients on a fixed batch) or neither (use .grad)")
        allowed = tuple(k for k in SELECTION_OPTIONS if k != "granularity")
        super().__init__(model, optimizer, sparsity, start_step, end_step, frequency, initial, total_steps,
                         prune_kwargs, allowed, bn_data, bn_batches, can_regrow=False)
        self.rate = float(rate)
        self.inputs = {"rate": self.rate}
        if loss_fn is not None:
            self.inputs.update(loss_fn=loss_fn, data=data)
        self.config["rate"] = self.rate
        if self.pruning_step(0):
            self._apply(self.target_at(0))

    def _apply(self, sparsity: float) -> bool:
        return self._prune(sparsity, score="fggp", **self.inputs)


class Cyclical(Pruner):
    """Cyclical pruning (Srinivas et al. 2022, "Cyclical Pruning for Sparse Neural Networks"):
    the same ramp from ``initial`` to ``sparsity`` repeated over ``cycles`` cycles of
    ``total_steps`` (``cyclical_sparsity``; cycle ``c`` covers steps ``[floor(cT/C),
    floor((c+1)T/C))`` and ends at the target).

    Masks change at each cycle's first step, its last step (so every cycle reaches the target),
    and every ``frequency`` steps from the cycle's start. At a cycle start the masks are
    recomputed over all weights (``regrow=True``) to the cycle's initial sparsity, which lets
    weights pruned in error come back: with ``initial=0`` every weight is kept (the pruned ones
    restart from 0 and train densely until the ramp prunes again); with ``initial > 0`` the kept
    set is chosen by ``regrowth_scores`` (``|w|`` kept, ``lr * |g|`` pruned, the projection step
    of the projected-gradient view of the paper), which needs ``loss_fn`` and ``data``. Within a
    cycle the smallest ``|w|`` among the kept weights are pruned (pruned weights stay pruned).

    Args:
        ramp: "cubic" (the paper's, Zhu & Gupta's shape), "linear", "constant"/"step".
        frequency: pruning every this many steps within a cycle (1: every step).
        **prune_kwargs: ``allocation``, ``granularity``, ``exclude``, ``min_density``.
    """

    def __init__(self, model, optimizer, sparsity: float, cycles: int, total_steps: int, *, ramp: str = "cubic",
                 initial: float = 0.0, frequency: int = 1, loss_fn: Optional[Callable] = None, data=None,
                 bn_data=None, bn_batches: Optional[int] = None, **prune_kwargs):
        target = check_sparsity(sparsity)
        initial = check_sparsity(initial, "initial")
        cycles = check_int(cycles, "cycles", 1)
        total_steps = check_int(total_steps, "total_steps", 1)
        if initial > target:
            raise ValueError(f"initial={initial:g}: expected at most sparsity={target:g}")
        cyclical_sparsity(0, target, cycles, total_steps, ramp, initial)  # checks ramp and cycles <= total_steps
        self.frequency = check_int(frequency, "frequency", 1)
        self.target, self.cycles, self.total_steps, self.ramp, self.initial = target, cycles, total_steps, ramp, initial
        starts = [(c * total_steps) // cycles for c in range(cycles)]
        self.starts = starts
        regrows_above_zero = any(self.target_at(a) > 0 for a in starts)
        _regrowth_inputs(loss_fn, data, regrows_above_zero, "a cycle start above sparsity 0")
        super().__init__(model, optimizer, prune_kwargs, SELECTION_OPTIONS, bn_data, bn_batches)
        self.loss_fn, self.data = loss_fn, data
        self.config = {"sparsity": target, "cycles": cycles, "total_steps": total_steps, "ramp": ramp,
                       "initial": initial, "frequency": self.frequency, **self.prune_kwargs}
        self._on_step(0)

    def target_at(self, t: int) -> float:
        return cyclical_sparsity(t, self.target, self.cycles, self.total_steps, self.ramp, self.initial)

    def _action(self, t: int) -> Optional[str]:
        """What step ``t`` does: "regrow" (a cycle starts), "prune", or None."""
        if t >= self.total_steps:
            return None  # the last cycle's last step (t = T - 1) reached the target
        if cycle_start(t, self.cycles, self.total_steps):
            return "regrow"
        start = self.starts[cycle_index(t, self.cycles, self.total_steps)]
        last = t + 1 == self.total_steps or cycle_start(t + 1, self.cycles, self.total_steps)
        return "prune" if last or (t - start) % self.frequency == 0 else None

    def _on_step(self, t: int) -> bool:
        action = self._action(t)
        if action == "regrow":
            return self._regrow(self.target_at(t), self.loss_fn, self.data)
        return self._prune(self.target_at(t)) if action == "prune" else False

    def step_selects(self, t: int) -> bool:
        return self._action(t) is not None
