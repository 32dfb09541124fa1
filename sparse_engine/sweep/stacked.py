"""Stacked units: K trials of one group (dense parents, or pruning trials) trained as one stacked model
(``sparse_engine.stack``).

:func:`run_stacked` is ``runner.UNIT_RUNNERS``' entry for units of two or more trials (the
coordinator packs them with ``--stack K``; ``TrialSpec.group_key`` says which trials may share a
stack). Each trial is built as it would be alone (``Trial(..., stacked=True)``: its data, its model
(a parent's initialised from its seed, a pruning trial's sparse model loaded from its parent), its
optimizer; not its pruner or LR schedule), resumed from its own checkpoint, and recorded through its
own ``TrialRecorder``. Then:

* the K models become one ``StackedModel``, trained by ``StackedSGD``/``StackedAdamW`` with each
  trial's learning rate and weight decay, under ``mask_stacked_optimizer``;
* each trial's LR schedule runs on its own stand-in optimizer (``PerModelLR``), a parent keeps its
  model's snapshots at its ``snapshot_steps``, and a pruning trial's pruner is
  built by its own method on its model's view of the stack (``StackedPruners``: the masks every
  model selects at a step come from one ``topk_mask`` call);
* at every step model k trains on the batch its own shuffling generator draws, as alone: the
  ``(K, B, ...)`` inputs gather K index sets of the one data set, and the loss is the sum of the K
  models' mean cross-entropies, so model k's gradient is that of its own loss;
* a trial resumed from its checkpoint gets it after its pruner is built on the fresh model, as
  alone; trials resumed from different epochs train in separate stacks;
* after every epoch each trial's state is copied out of the stack into its ``Trial`` (weights,
  masks, buffers, optimizer state, learning rate), which then measures, records and checkpoints
  itself as a trial run alone does. The checkpoint of a stacked trial is an ordinary one: it
  resumes in any stack, or alone.

A trial whose training loss is not finite, or whose pruner or metrics raise, is recorded failed; its
model stays in the stack (every stacked op is per model, so its NaNs cannot reach the others) but is
no longer pruned, measured or recorded. A unit whose architecture cannot be stacked
(``stack.check_stackable``) runs one trial at a time. Results equal the trials' results alone up to
float rounding (the stacked kernels sum in another order): the same masks where no score ties within
that rounding. Each model's pruner draws from the trial's own torch RNG stream (``StackedPruners``'
``rng_streams``, checkpointed with the trial); random ops of the model's forward (dropout) draw from
the stack's own stream.
"""
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from sparse_engine.stack import stack
from sparse_engine.stack.convert import check_stackable, stacked_layers
from sparse_engine.stack.layers import StackedLayer
from sparse_engine.stack.optim import PerModelLR, StackedAdamW, StackedSGD, mask_stacked_optimizer
from sparse_engine.ops.dispatch import time_ms
from sparse_engine.pruning.methods.lottery import snapshot
from sparse_engine.stack.pruning import StackedPruners
from sparse_engine.sweep import components
from sparse_engine.sweep.journal import StoreError
from sparse_engine.sweep.runner import TrialRecorder, WorkerEnv, build_trial, run_trials_one_by_one
from sparse_engine.sweep.store import Store, load_torch
from sparse_engine.sweep.trial import Trial
from sparse_engine.train import train_step


# stack = "auto": units of up to AUTO_MAX trials; stacks take at most MEMORY_SHARE of the free memory, and are
# used where a stacked step takes at most FASTER times the same trials' steps one at a time. (The probe times
# steps only; on the 2-core CPU here it measured the demo's MLP stacked at 0.68-0.97 of the time alone, while its
# 24 pruning trials ran 1.59x faster stacked: ties go to stacking.)
AUTO_MAX = 32
MEMORY_SHARE = 0.5
FASTER = 1.0
_decisions: dict = {}  # group_key -> the probe's record, per worker process


def stacked_optimizer(stacked, configs: list):
    """``StackedSGD``/``StackedAdamW`` over ``stacked`` with each optimizer config's learning rate and weight
    decay (the configs' other settings are equal: ``TrialSpec.group_key``)."""
    c = configs[0]
    lr, wd = [x["lr"] for x in configs], [x["weight_decay"] for x in configs]
    if c["name"] == "sgd":
        return StackedSGD(stacked, lr=lr, momentum=c["momentum"], weight_decay=wd, nesterov=c["nesterov"])
    return StackedAdamW(stacked, lr=lr, betas=(c["beta1"], c["beta2"]), eps=c["eps"], weight_decay=wd)


class _Member:
    """One trial of a stack: its spec, recorder, built ``Trial``, checkpoint, and outcome."""

    def __init__(self, spec, recorder: TrialRecorder, saved: Optional[dict]):
        self.spec, self.recorder, self.saved = spec, recorder, saved
        self.trial: Optional[Trial] = None
        self.rng: Optional[torch.Tensor] = None  # torch's RNG state when its Trial was built: its pruner's stream
        self.outcome: Optional[dict] = None

    def build(self, store: Store, env: WorkerEnv) -> "_Member":
        """Build its ``Trial`` for a stack, and keep torch's RNG state after that as its pruner's stream."""
        self.trial = build_trial(self.spec, store, env, stacked=True)
        self.rng = torch.get_rng_state()
        return self

    def fail(self, error: BaseException) -> None:
        self.recorder.failed(error)
        self.outcome = {"trial": self.spec.id, "state": "failed", "error": f"{type(error).__name__}: {error}"}


class _Stack:
    """Members at the same epoch, trained as one stacked model (module docstring)."""

    def __init__(self, members: list):
        self.members = members
        trials = [m.trial for m in members]
        self.device = trials[0].device
        self.model = stack([t.model for t in trials])
        self.layers = [(n, m) for n, m in stacked_layers(self.model.module) if isinstance(m, StackedLayer)]
        self.optimizer = stacked_optimizer(self.model, [t.config["pretrain" if t.pretrain else "train"]["optimizer"]
                                                        for t in trials])
        mask_stacked_optimizer(self.optimizer, self.model)
        self.lrs = PerModelLR(self.optimizer, [t.make_scheduler for t in trials])
        self.pruners = StackedPruners(self.model, self.optimizer, [t.make_pruner for t in trials],
                                      rng_streams=[m.rng for m in members], isolate_failures=True)
        self.names = [(p, n.removeprefix("module.")) for n, p in self.model.named_parameters()]
        self.snapshotting = [(k, m) for k, m in enumerate(members) if m.trial.snapshot_steps]
        self._check_pruners()
        outer = torch.get_rng_state()
        for k, m in self.active:
            if m.saved is not None:
                try:
                    self._resume(k, m)
                except Exception as e:  # noqa: BLE001 - e.g. a checkpoint of another config: that trial fails
                    m.fail(e)
                    self.pruners.stop(k)
                if m.saved["rng"].get("stack_torch") is not None:
                    outer = m.saved["rng"]["stack_torch"]
        torch.set_rng_state(outer)  # the stacked model's own stream (dropout), as checkpointed

    @property
    def active(self) -> list:
        return [(k, m) for k, m in enumerate(self.members) if m.outcome is None]

    # -- one model's state in and out of the stack ------------------------------------------------

    @torch.no_grad()
    def _resume(self, k: int, member: _Member) -> None:
        """Model k's checkpoint into its ``Trial`` and into the stack, in the order ``Trial.load_state_dict``
        loads it: weights and masks, pruner, LR schedule, optimizer (after the pruner's construction on the
        fresh model, as alone: some pruners read the model they start from)."""
        trial, saved = member.trial, member.saved
        trial.load_state_dict(saved)
        self.pruners.streams[k] = torch.get_rng_state()  # the model's own stream, as checkpointed
        for name, layer in self.layers:
            layer.load_slice_(k, trial.model.get_submodule(name))
        if saved["pruner"] is not None:
            self.pruners.pruners[k].load_state_dict(saved["pruner"])
        self.lrs.load_model_state(k, saved["scheduler"], [g["lr"] for g in trial.optimizer.param_groups])
        for p, name in self.names:
            for key, value in trial.optimizer.state.get(trial.model.get_parameter(name), {}).items():
                state = self.optimizer.state[p]  # model k's at [k], AdamW's step count included
                if key not in state:  # on the trial's device for it (AdamW's step: the CPU, as torch keeps it)
                    state[key] = torch.zeros((len(self.members), *value.shape), dtype=value.dtype, device=value.device)
                state[key][k].copy_(value)

    @torch.no_grad()
    def copy_out(self, k: int) -> None:
        """Model k's weights, masks, buffers, optimizer state and learning rate into its ``Trial``."""
        trial = self.members[k].trial
        for name, layer in self.layers:
            # the masks travel in the state dict's metadata: a dense layer (a parent's) ignores them
            trial.model.get_submodule(name).load_state_dict(layer.unstacked(k).state_dict())
        for p, name in self.names:
            single = trial.model.get_parameter(name)
            state = self.optimizer.state.get(p)
            if state:
                trial.optimizer.state[single] = {key: (v[k] if v.dim() > 0 else v).clone() for key, v in state.items()}
            else:
                trial.optimizer.state.pop(single, None)
        for g, sg in zip(trial.optimizer.param_groups, self.optimizer.param_groups):
            g["lr"] = float(sg["lr"][k])
        trial.scheduler = self.lrs.schedulers[k]
        trial.pruner = None if trial.pretrain else self.pruners.pruners[k]

    def _check_pruners(self) -> None:
        for k, error in list(self.pruners.failed.items()):
            if self.members[k].outcome is None:
                self.members[k].fail(error)

    # -- training ---------------------------------------------------------------------------------

    def train_epoch(self) -> tuple[list, float]:
        """One epoch of every model; returns each model's mean training loss and the seconds taken."""
        started = time.perf_counter()
        trials = [m.trial for m in self.members]
        n, batch = trials[0].x_train.shape[0], trials[0].batch_size
        orders = [torch.randperm(n, generator=t.generator) for t in trials]
        for t in trials:  # a parent's snapshot steps count from the epoch's first
            t._step = t.epoch * t.steps_per_epoch
        self.model.train()
        totals, count = torch.zeros(len(trials), dtype=torch.float64), 0
        for i in range(0, n, batch):
            idx = torch.stack([o[i:i + batch] for o in orders])
            totals += self.step(idx) * idx.shape[1]
            count += idx.shape[1]
        self.pruners.on_epoch_end()
        return (totals / max(count, 1)).tolist(), time.perf_counter() - started

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every model, model k on the training samples ``idx[k]``; returns the K
        losses (float64, on the CPU)."""
        x, y = self.members[0].trial.x_train, self.members[0].trial.y_train
        xb, yb = x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)
        out = self.model(xb)
        losses = F.cross_entropy(out.flatten(0, 1), yb.flatten(), reduction="none").view(idx.shape).mean(1)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        self.lrs.step()
        self.pruners.step()
        for k, m in self.snapshotting:
            if m.outcome is None:  # a parent keeps its model after the steps its tickets rewind to
                m.trial._step += 1
                if m.trial._step in m.trial.snapshot_steps:
                    self.copy_out(k)
                    m.trial.snapshots[m.trial._step] = snapshot(m.trial.model)
        return losses.detach().to("cpu", torch.float64)

    def run(self) -> None:
        """Train every member to its last epoch, recording each as its own trial."""
        while self.active and not self.members[self.active[0][0]].trial.finished:
            losses, seconds = self.train_epoch()
            self._check_pruners()
            share = seconds / max(len(self.active), 1)
            for k, member in self.active:
                self.copy_out(k)
                member.trial.rng_extra = {"stack_torch": torch.get_rng_state()}
                try:
                    with self.pruners.model_rng(k):  # what the trial draws (metrics) and saves: its own stream
                        metrics = member.trial.end_epoch(losses[k], share)
                        member.recorder.epoch_done(member.trial, metrics)
                except StoreError:
                    raise
                except Exception as e:  # noqa: BLE001 - a diverged model (NaN loss) or a failing metric
                    member.fail(e)
                    self.pruners.stop(k)
        for k, member in self.active:
            try:
                with self.pruners.model_rng(k):
                    member.recorder.finished(member.trial)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. a final metric that raises
                member.fail(e)
                continue
            member.outcome = {"trial": member.spec.id, "state": "done", "error": None}


def _fastest_ms(runs: dict, device, rounds: int = 7, budget_s: float = 2.0) -> dict:
    """``{name: ms}``: the fastest of ``rounds`` interleaved calls of each function, after one warm-up call
    (noise from other work on the machine only adds time); after two rounds, no more once ``budget_s`` is spent."""
    best = {name: float("inf") for name in runs}
    started = time.perf_counter()
    for r in range(rounds + 1):
        if r > 2 and time.perf_counter() - started > budget_s:
            break
        for name, run in runs.items():
            ms = time_ms(run, device)
            if r:
                best[name] = min(best[name], ms)
    return best


def _free_bytes(device) -> Optional[int]:
    """Free memory of ``device``: CUDA's, or the host's ``MemAvailable`` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _model_bytes(trial: Trial, xb: torch.Tensor) -> int:
    """Memory one trial's training step needs: measured on CUDA (the peak of a step); on CPU, four copies of
    the parameters (weights, gradients, two optimizer states) and three of every layer's output (kept for
    backward, its gradient, slack)."""
    model, device = trial.model, trial.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        F.cross_entropy(model(xb), torch.zeros(xb.shape[0], dtype=torch.long, device=device)).backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) - base
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size()))
             for m in model.modules() if not m._modules]
    try:
        with torch.no_grad():
            model(xb)
    finally:
        for h in hooks:
            h.remove()
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters()) + 3 * sum(sizes)


def probe(specs: list, store: Store, env: WorkerEnv) -> dict:
    """How many of ``specs`` (ready trials of one group) to stack, measured on throwaway copies of them: the
    training step of the first trial alone (its batch, forward, backward, optimizer, LR schedule and pruner:
    ``train.train_step``), times K, against the step of the first K as one stack (``_Stack.step``), K first
    capped by memory (``MEMORY_SHARE`` of the free memory). Steps at which a pruner selects masks do not
    count (the fastest of several steps is compared). Returns ``{"k": the stack size to use (1: one at a
    time), "probed", "memory_cap", "alone_ms", "stacked_ms"}``. The RNGs are left as they were."""
    device = torch.device(env.device)
    rng = (random.getstate(), np.random.get_state())
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            alone = build_trial(specs[0], store, env)
            n, batch = alone.x_train.shape[0], alone.batch_size
            xb = alone.x_train[:batch].to(device)
            free = _free_bytes(device)
            cap = AUTO_MAX if free is None else max(1, int(MEMORY_SHARE * free // max(_model_bytes(alone, xb), 1)))
            k = min(len(specs), cap)
            record = {"probed": k, "memory_cap": cap, "alone_ms": None, "stacked_ms": None}
            if k < 2:
                return {**record, "k": 1}
            together = _Stack([_Member(spec, None, None).build(store, env) for spec in specs[:k]])
            ids = torch.stack([torch.randperm(n)[:batch] for _ in range(k)])  # k batches, gathered as in training

            def one_by_one():
                for i in ids:
                    train_step(alone.model, alone.optimizer, alone.x_train[i].to(device), alone.y_train[i].to(device),
                               alone.scheduler, alone.pruner.step if alone.pruner is not None else None)

            ms = _fastest_ms({"alone": one_by_one, "stacked": lambda: together.step(ids)}, device)
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
    record.update(alone_ms=round(ms["alone"], 3), stacked_ms=round(ms["stacked"], 3))
    return {**record, "k": k if ms["stacked"] <= FASTER * ms["alone"] else 1}


def run_stacked(unit: list, env: WorkerEnv) -> list:
    """Run (or resume) a unit of trials as stacked models; one outcome per trial, as ``run_trial``'s.

    With ``env.stack_auto`` the unit is split into stacks of the size :func:`probe` chooses for its group
    (measured once per worker process), or run one trial at a time where stacking does not measure faster.
    Trials checkpointed by an earlier run resume the way they trained (stacked or alone), so that a
    resumed sweep ends with exactly the uninterrupted run's results."""
    try:
        check_stackable(components.build(unit[0].config["model"]), "model")
    except (TypeError, ValueError):
        return run_trials_one_by_one(unit, env)
    if not env.stack_auto:
        return _run_stack(unit, env, {})
    store = Store(env.directory)
    modes = {}
    for spec in unit:
        path = store.checkpoint(spec.id)
        modes[spec.id] = load_torch(path).get("stacked") if path.exists() else None
    key = unit[0].group_key()
    fresh = [spec for spec in unit if modes[spec.id] is None]
    if len(fresh) > 1 and key not in _decisions:
        try:
            _decisions[key] = probe(fresh, store, env)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: one at a time (each trial's errors its own)
            _decisions[key] = {"k": 1, "probe_error": f"{type(e).__name__}: {e}"}
            if torch.device(env.device).type == "cuda":
                torch.cuda.empty_cache()
    decision = _decisions.get(key, {"k": len(unit)})
    alone = [spec for spec in unit if modes[spec.id] is False or (modes[spec.id] is None and decision["k"] < 2)]
    together = [spec for spec in unit if spec not in alone]
    outcomes = {o["trial"]: o for o in run_trials_one_by_one(alone, env, stack_probe=decision)}
    size = decision["k"] if decision["k"] >= 2 else max(len(together), 1)  # resumed stacked trials: together again
    for i in range(0, len(together), size):
        outcomes.update((o["trial"], o) for o in _run_stack(together[i:i + size], env, {"stack_probe": decision}))
    return [outcomes[spec.id] for spec in unit]


def _run_stack(unit: list, env: WorkerEnv, started: dict) -> list:
    store = Store(env.directory)
    members, outcomes, locks = [], {}, []
    try:
        for spec in unit:
            lock = store.trial_lock(spec.id)
            if not lock.acquire():
                outcomes[spec.id] = {"trial": spec.id, "state": "busy",
                                     "error": "another process is running this trial"}
                continue
            locks.append(lock)
            recorder = TrialRecorder(store, spec, env)
            member = _Member(spec, recorder, recorder.checkpoint())
            members.append(member)
            recorder.started(member.saved, stacked=len(unit), **started)
            try:
                member.build(store, env)
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded; the unit's other trials go on
                member.fail(e)
        by_epoch: dict = {}
        for m in members:
            if m.outcome is None:
                by_epoch.setdefault(0 if m.saved is None else m.saved["epoch"], []).append(m)
        for group in by_epoch.values():
            try:
                _Stack(group).run()
            except StoreError:
                raise
            except Exception as e:  # noqa: BLE001 - the stack itself failed: every trial still in it
                for m in group:
                    if m.outcome is None:
                        m.fail(e)
        outcomes.update((m.spec.id, m.outcome) for m in members)
    except StoreError as e:
        for m in members:
            if m.outcome is None or m.outcome["state"] != "done":
                outcomes[m.spec.id] = {"trial": m.spec.id, "state": "failed", "error": str(e), "store_error": True}
    finally:
        for lock in locks:
            lock.release()
    return [outcomes[spec.id] for spec in unit]

