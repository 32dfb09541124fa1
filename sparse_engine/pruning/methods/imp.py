"""IMP: iterative magnitude pruning with phases, retraining LR schedules, budgets and rewinding.

    pruner = IMP(model, optimizer, 0.9, phases=3, epochs_per_phase=2, lr_schedule="llr",
                 steps_per_epoch=len(loader), lr_options={"max_lr": 0.1})

(a ``sparse_engine.pruning.methods.Pruner``; the loop is in ``sparse_engine.pruning.methods.pruners``).
"""
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from sparse_engine.pruning.methods.lottery import check_lottery_options, make_ticket, snapshot
from sparse_engine.pruning.methods.lr_schedules import RETRAIN_SCHEDULES, relative_norm_drop, retrain_lr_schedule
from sparse_engine.pruning.methods.pruner import SCORED_OPTIONS, Pruner, check_int, check_sparsity
from sparse_engine.pruning.methods.reinit import reinitialize_
from sparse_engine.pruning.methods.schedules import imp_phase_sparsities
from sparse_engine.pruning.select import prune_


class IMP(Pruner):
    """Iterative magnitude pruning: prune, then retrain, over several phases (Han et al. 2015;
    Frankle & Carbin 2019; Renda et al. 2020), on a trained model.

    Phase ``k`` (0-based) starts by pruning to ``s_k`` (``imp_phase_sparsities``: a constant
    per-phase rate ``p = 1 - ((1 - s) / (1 - s_0))^(1/phases)`` of the weights still kept, or the
    given ``rates``; ``s_0`` the model's current sparsity) and then retrains for its epochs. Phase
    0 starts at the construction; phase ``k + 1`` starts at the ``on_epoch_end()`` that ends
    phase ``k``'s epochs. After the last phase's epochs ``finished`` is True and masks stay.

    Budgeted IMP (BIMP, Zimmer et al. 2023): ``budget_epochs`` total retraining epochs split
    across phases, ``budget // phases`` each and one more for the first ``budget % phases``.

    Retraining learning rate: ``lr_schedule`` is None (the caller handles the LR), a name in
    ``RETRAIN_SCHEDULES`` ("ft", "lrw", "slr", "clr", "llr", "allr"; ``retrain_lr_schedule`` with
    ``lr_options``, e.g. ``{"max_lr": 0.1}`` or ``{"original_schedule": lrs}``), or a callable
    ``(optimizer, total_steps) -> LRScheduler``. A new scheduler of ``epochs * steps_per_epoch``
    steps starts at each phase, is stepped by ``step()`` and is ``lr_scheduler``; for "allr" the
    pruner passes the phase's relative norm drop (over all parameters, ``relative_norm_drop``) and
    pruned fraction (the share of kept weights the phase's prune removed).

    ``rewind``: None (fine-tune the pruned weights), or a model ``state_dict`` (e.g. taken early
    in the original training) to which the parameters and buffers are reset after every prune,
    pruned weights zeroed, and the optimizer state cleared (weight rewinding, Frankle et al. 2020,
    "Linear Mode Connectivity and the Lottery Ticket Hypothesis"; Renda et al. 2020). It is saved in
    the pruner's ``state_dict``.

    Lottery tickets (Frankle & Carbin 2019; open_lth's levels): ``dense_epochs`` trains the model
    densely first (phase 0 starts at the ``on_epoch_end()`` that ends them), and ``rewind_step=k``
    rewinds every phase to the parameters and buffers the model had after ``k`` optimizer steps
    (``k = 0``: at the construction, i.e. the initialisation; ``k > 0``: open_lth's
    ``rewinding_steps``, Frankle et al. 2020), captured during the dense epochs. ``ticket()``
    returns the mask with its rewind weights (``sparse_engine.pruning.methods.lottery``), to save
    and reload with ``load_ticket``. ``reinit=True`` is the random-reinitialisation control: the
    last phase starts from the same mask (the earlier phases run as without it) with the pruned
    layers' weights and biases drawn anew from their initialisation (``reinitialize_``, from a
    generator the pruner owns) instead of the rewind weights.

    Args:
        sparsity: final target in [0, 1), above the current sparsity (None with ``rates``).
        phases: number of phases (int >= 1); or ``rates``, a list of per-phase rates in (0, 1).
        epochs_per_phase / budget_epochs: retraining epochs of each phase, or in total (one of them).
        steps_per_epoch: optimizer steps per epoch (needed with ``lr_schedule``).
        dense_epochs: dense training epochs before phase 0's prune (default 0: prune now).
        rewind_step: rewind to the weights after this many steps (None: see ``rewind``).
        reinit: the random-reinitialisation control of the last phase (needs a rewind point).
        **prune_kwargs: ``prune_``'s ``score`` (default magnitude), ``allocation``, ``granularity``,
            ``exclude``, ``min_density`` and the score's inputs.
    """

    def __init__(self, model, optimizer, sparsity: Optional[float], phases: Optional[int] = None,
                 epochs_per_phase: Optional[int] = None, *, rates: Optional[Sequence[float]] = None,
                 budget_epochs: Optional[int] = None, lr_schedule: Union[None, str, Callable] = None,
                 steps_per_epoch: Optional[int] = None, lr_options: Optional[dict] = None,
                 rewind: Optional[Mapping[str, torch.Tensor]] = None, bn_data=None,
                 bn_batches: Optional[int] = None, dense_epochs: int = 0, rewind_step: Optional[int] = None,
                 reinit: bool = False, **prune_kwargs):
        if sparsity is not None or rates is None:
            sparsity = check_sparsity(sparsity)
        if phases is not None:
            phases = check_int(phases, "phases", 1)
        if (epochs_per_phase is None) == (budget_epochs is None):
            raise ValueError("epochs_per_phase/budget_epochs: give exactly one (retraining epochs per phase, or in "
                             "total for budgeted IMP)")
        if lr_schedule is not None:
            if not callable(lr_schedule) and lr_schedule not in RETRAIN_SCHEDULES:
                raise ValueError(f"lr_schedule: expected None, one of {RETRAIN_SCHEDULES} or a callable "
                                 f"(optimizer, total_steps) -> LRScheduler, got {lr_schedule!r}")
            steps_per_epoch = check_int(steps_per_epoch, "steps_per_epoch", 1)
        elif lr_options is not None:
            raise ValueError("lr_options: given without lr_schedule")
        dense_epochs = check_lottery_options(dense_epochs, rewind_step, reinit, rewind, lr_schedule, steps_per_epoch)
        super().__init__(model, optimizer, prune_kwargs, SCORED_OPTIONS, bn_data, bn_batches)
        if sparsity is not None and sparsity <= self.sparsity:
            raise ValueError(f"sparsity={sparsity:g} is not above the model's current sparsity {self.sparsity:.6g} "
                             f"(over the pruned layers): IMP only prunes")
        self.phase_sparsities = imp_phase_sparsities(sparsity, phases, rates, current=self.sparsity)
        self.phases = len(self.phase_sparsities)
        if epochs_per_phase is not None:
            self.phase_epochs = [check_int(epochs_per_phase, "epochs_per_phase", 1)] * self.phases
        else:
            budget = check_int(budget_epochs, "budget_epochs", self.phases)
            self.phase_epochs = [budget // self.phases + (k < budget % self.phases) for k in range(self.phases)]
        self.lr_schedule, self.steps_per_epoch = lr_schedule, steps_per_epoch
        self.lr_options = dict(lr_options or {})
        self.rewind = None
        if rewind is not None:
            self.rewind = self._check_rewind(rewind)
        self.config = {"sparsity": sparsity, "phase_sparsities": self.phase_sparsities,
                       "phase_epochs": self.phase_epochs, "lr_schedule": lr_schedule,
                       "steps_per_epoch": steps_per_epoch, "lr_options": self.lr_options,
                       "rewind": rewind is not None, **self.prune_kwargs}
        self.phase, self.epoch_in_phase, self.steps_in_epoch, self.finished = 0, 0, 0, False
        self.norm_drop = self.pruned_fraction = None
        self.lr_scheduler = None
        # -- lottery tickets: dense epochs first, a rewind point captured at rewind_step, reinit control
        self.dense_epochs, self.rewind_step, self.reinit = dense_epochs, rewind_step, reinit
        if dense_epochs or rewind_step is not None or reinit:
            self.config.update(dense_epochs=dense_epochs, rewind_step=rewind_step, reinit=reinit)
        if reinit and self.generator is None:
            self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 62, ())))
        self.dense_epochs_done = 0
        if rewind_step == 0:
            self.rewind = snapshot(self.model)
        if dense_epochs:
            self.lr_scheduler = self._new_scheduler(dense_epochs)
        else:
            self._start_phase()

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: the dense epochs, then the retraining epochs of all phases."""
        return self.dense_epochs + sum(self.phase_epochs)

    def _check_rewind(self, rewind) -> dict:
        if not isinstance(rewind, Mapping):
            raise TypeError(f"rewind: expected None or a model state_dict, got {type(rewind).__name__}")
        own = self.model.state_dict()
        unknown = sorted(set(rewind) - set(own))
        if unknown:
            raise ValueError(f"rewind: keys {unknown[:4]} are not in the model's state_dict")
        for k, v in rewind.items():
            if not isinstance(v, torch.Tensor) or v.shape != own[k].shape:
                raise ValueError(f"rewind['{k}']: expected a tensor of shape {tuple(own[k].shape)}, got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
        return {k: v.detach().clone() for k, v in rewind.items()}

    @property
    def in_dense_epochs(self) -> bool:
        """True during the ``dense_epochs`` before phase 0."""
        return self.dense_epochs_done < self.dense_epochs

    @torch.no_grad()
    def _rewind_weights(self) -> None:
        own = self.model.state_dict(keep_vars=True)
        for k, v in self.rewind.items():
            own[k].copy_(v)
        for _, m in self.layers:
            m.apply_mask_()
        if self.reinit and self.phase + 1 == self.phases:
            reinitialize_([m for _, m in self.layers], self.generator, bias=True)
        self.optimizer.state.clear()

    def ticket(self) -> dict:
        """The current lottery ticket: the masks of the pruned layers and the rewind weights
        (``make_ticket``); save it with ``torch.save`` and load it with ``load_ticket``."""
        if self.in_dense_epochs:
            raise RuntimeError("ticket: no mask yet; IMP is in its dense epochs (phase 0 prunes at their end)")
        if self.rewind is None:
            raise RuntimeError("ticket: this IMP has no rewind point (pass rewind=... or rewind_step=k)")
        return make_ticket(self.layers, self.rewind, sparsity=self.sparsity, phase=self.phase,
                           rewind_step=self.rewind_step)

    def _start_phase(self) -> None:
        s = self.phase_sparsities[self.phase]
        kept = self.kept()
        before = None
        if self.lr_schedule == "allr":
            before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.sparsity = s
        prune_(self.model, s, **self.prune_kwargs)
        self.pruned_fraction = 1.0 - self.kept() / kept
        self.norm_drop = relative_norm_drop(before, self.model) if before is not None else None
        if self.rewind is not None:
            self._rewind_weights()
        self._recalibrate()
        self.lr_scheduler = self._new_scheduler()

    def _new_scheduler(self, epochs: Optional[int] = None):
        if self.lr_schedule is None:
            return None
        total = (self.phase_epochs[self.phase] if epochs is None else epochs) * self.steps_per_epoch
        if callable(self.lr_schedule):
            return self.lr_schedule(self.optimizer, total)
        return retrain_lr_schedule(self.lr_schedule, self.optimizer, total, **self.lr_options,
                                   norm_drop=self.norm_drop, pruned_fraction=self.pruned_fraction)

    def _on_step(self, t: int) -> bool:
        if t == self.rewind_step and self.in_dense_epochs:
            self.rewind = snapshot(self.model)
        self.steps_in_epoch += 1
        if self.lr_scheduler is not None and not self.finished:
            self.lr_scheduler.step()
        return False

    def step_selects(self, t: int) -> bool:
        return False  # IMP prunes at epoch ends

    def _on_epoch(self, e: int) -> bool:
        if self.finished:
            return False
        if self.lr_scheduler is not None and self.steps_in_epoch != self.steps_per_epoch:
            warnings.warn(f"IMP: epoch {e} took {self.steps_in_epoch} steps, not steps_per_epoch="
                          f"{self.steps_per_epoch}; the phase's LR schedule assumes the latter", stacklevel=3)
        self.steps_in_epoch = 0
        if self.in_dense_epochs:
            last = self.dense_epochs_done + 1 == self.dense_epochs
            if last and self.rewind_step is not None and self.rewind is None:
                raise RuntimeError(f"rewind_step={self.rewind_step}: the dense epochs ended after {self.step_count} "
                                   f"steps, before step {self.rewind_step}; the rewind point was never reached")
            self.dense_epochs_done += 1
            if not last:
                return False
            self._start_phase()
            return True
        self.epoch_in_phase += 1
        if self.epoch_in_phase < self.phase_epochs[self.phase]:
            return False
        if self.phase + 1 == self.phases:
            self.finished = True
            return False
        self.phase += 1
        self.epoch_in_phase = 0
        with self.changing_model():  # the prune, rewinding, recalibration and the new LR schedule, or none
            self._start_phase()
        return True

    def _extra_state(self) -> dict:
        state = {"phase": self.phase, "epoch_in_phase": self.epoch_in_phase, "steps_in_epoch": self.steps_in_epoch,
                 "finished": self.finished, "norm_drop": self.norm_drop, "pruned_fraction": self.pruned_fraction}
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.rewind is not None:
            state["rewind"] = {k: v.clone() for k, v in self.rewind.items()}
        if self.dense_epochs:
            state["dense_epochs_done"] = self.dense_epochs_done
        return state

    def _load_extra_state(self, state: dict) -> None:
        self.phase, self.epoch_in_phase = state["phase"], state["epoch_in_phase"]
        self.steps_in_epoch, self.finished = state["steps_in_epoch"], state["finished"]
        self.norm_drop, self.pruned_fraction = state["norm_drop"], state["pruned_fraction"]
        self.rewind = None if "rewind" not in state else {k: v.detach().clone() for k, v in state["rewind"].items()}
        self.dense_epochs_done = state.get("dense_epochs_done", 0)
        if self.lr_schedule is not None:
            self.lr_scheduler = self._new_scheduler(self.dense_epochs if self.in_dense_epochs else None)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            # Building the scheduler set the phase's first LR; the saved step's LR is the one to train with.
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
