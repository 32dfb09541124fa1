"""What a trial is, in the process that trains it: its parts, one epoch, its state, its result.

:class:`Trial` builds everything a trial's resolved config says (data, model, optimizer, LR
schedule, pruning method, shuffling generator) and trains it epoch by epoch. ``state_dict()`` holds
all that the rest of the run depends on: the model (masks included), optimizer, LR scheduler,
pruner, every RNG (torch, the shuffling generator, Python's, NumPy's, CUDA's), the per-epoch
metrics so far and the time spent. A trial rebuilt from its spec and given that state continues
exactly as the uninterrupted run would (same thread count: CPU float results can depend on it).

A pretrain trial trains the dense parent with SGD/AdamW under the pretraining LR schedule (and,
when its config lists ``snapshot_steps``, keeps its model's state after each of those optimizer
steps: the rewind points of its lottery tickets); a prune trial loads its parent's final weights
(or initialises a fresh model, for methods that prune at initialisation), sparsifies the model and
hands it to its method's builder (``methods.py``).

Where a trial runs and how its progress is recorded (checkpoints, journal) is ``runner.py``'s
business, and which trials run together the executor's.
"""
import math
import random
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.nn import mask_optimizer, sparse_modules, sparsify, sparsity_report
from sparse_engine.pruning import retrain_lr_schedule
from sparse_engine.pruning.methods.lottery import snapshot
from sparse_engine.sweep import components
from sparse_engine.sweep.methods import MethodContext, lookup_method
from sparse_engine.sweep.metrics import evaluate_metrics, needs_parent
from sparse_engine.sweep.plan import TrialSpec
from sparse_engine.train import train_epoch


def make_optimizer(params, config: dict) -> torch.optim.Optimizer:
    """SGD or AdamW from a resolved optimizer config (``settings.OPTIMIZERS``)."""
    if config["name"] == "sgd":
        return torch.optim.SGD(params, lr=config["lr"], momentum=config["momentum"],
                               weight_decay=config["weight_decay"], nesterov=config["nesterov"])
    return torch.optim.AdamW(params, lr=config["lr"], betas=(config["beta1"], config["beta2"]), eps=config["eps"],
                             weight_decay=config["weight_decay"])


def saved_model(model: dict, state: dict, sparse: bool, device) -> nn.Module:
    """The model of config ``model`` (sparsified when ``sparse``) with the saved ``state`` dict, on
    ``device``, in eval mode."""
    out = components.build(model)
    if sparse:
        out = sparsify(out)
    out.load_state_dict(state)
    return out.to(device).eval()


def measure_saved(spec: TrialSpec, names: list, model_state: dict, parent_state: Optional[dict], device) -> dict:
    """The metrics ``names`` of a finished trial, from its final ``model.pt`` contents (and its
    parent's, for metrics that compare with it), without training it again."""
    _, _, x_test, y_test = components.load({**spec.config["data"], "dir": spec.data_dir})
    model = saved_model(spec.config["model"], model_state["model"], spec.kind == "prune", device)
    parent = None
    if parent_state is not None and needs_parent(names):
        parent = saved_model(spec.config["model"], parent_state["model"], False, device)
    return evaluate_metrics(names, model, x_test, y_test, device, parent)


def pretrain_lrs(pretrain: dict, steps: int) -> list[float]:
    """The parent's learning rate at each of its ``steps`` optimizer steps (the "original
    schedule" that retraining schedules such as SLR and CLR derive from)."""
    top, low, name = pretrain["optimizer"]["lr"], pretrain["lr_schedule"]["min_lr"], pretrain["lr_schedule"]["name"]
    span = max(steps - 1, 1)
    if name == "linear":
        return [top + (low - top) * t / span for t in range(steps)]
    if name == "cosine":
        return [low + (top - low) * (1 + math.cos(math.pi * t / span)) / 2 for t in range(steps)]
    return [top] * steps


def capture_rng(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": generator.get_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


class NoPruning:
    """A dense parent's pruner in a stack of parents (``sweep/stacked.py``): no step selects masks."""
    step_count = 0

    def step_selects(self, t: int) -> bool:
        return False

    def step(self) -> bool:
        return False

    def on_epoch_end(self) -> bool:
        return False


class Trial:
    """One trial's training state (module docstring).

    Args:
        spec: the trial.
        device: where to train (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
        parent_state: the parent's ``model.pt`` contents (``{"model": state_dict, "init": ...}``)
            for prune trials that start from a parent.
        stacked: a trial trained inside a stacked model (``sweep/stacked.py``): its model and
            optimizer are built, its LR schedule and pruner are not (the stack builds them, with
            ``make_scheduler`` and ``make_pruner``, on its per-model views).
    """

    def __init__(self, spec: TrialSpec, device, parent_state: Optional[dict] = None, stacked: bool = False):
        self.spec, self.config, self.stacked = spec, spec.config, stacked
        self.device = torch.device(device)
        self.pretrain = spec.kind == "pretrain"
        stage = self.config["pretrain"] if self.pretrain else self.config["train"]
        self.x_train, self.y_train, self.x_test, self.y_test = components.load(
            {**self.config["data"], "dir": spec.data_dir})
        self.batch_size, self.epochs = stage["batch_size"], stage["epochs"]
        self.steps_per_epoch = -(-self.x_train.shape[0] // self.batch_size)
        self.epoch, self.history, self.elapsed = 0, [], 0.0
        self.rng_extra: dict = {}  # more RNG states for its checkpoint (a stacked model's own stream)
        self.eval_every = 0 if self.pretrain else stage["eval_every"]
        seed = self.config["seed"]
        started = time.perf_counter()
        seed_everything(seed)
        self.generator = torch.Generator().manual_seed(seed)
        model = components.build(self.config["model"])
        self.init_state = None
        self.snapshot_steps = frozenset(self.config.get("snapshot_steps", ()))
        self.snapshots, self._step = {}, 0
        self.pruner = self.scheduler = None
        self._parent_weights, self._parent = (parent_state or {}).get("model"), None
        if self.pretrain:
            self.model = model.to(self.device)
            self.init_state = snapshot(self.model)
            self.optimizer = make_optimizer(self.model.parameters(), stage["optimizer"])
            if not stacked:
                self.scheduler = self.make_scheduler(self.optimizer)
        else:
            self._build_pruning(model, stage, parent_state)
        self.setup_s = time.perf_counter() - started

    def _build_pruning(self, model, train: dict, parent_state: Optional[dict]) -> None:
        self.method = lookup_method(self.config["method"]["name"])
        self._original_lrs = None
        if self.spec.parent is not None:
            if parent_state is None:
                raise ValueError(f"trial {self.spec.id}: needs its parent {self.spec.parent}'s final model")
            model.load_state_dict(parent_state["model"])
            pre = self.config["pretrain"]
            parent_steps = -(-self.x_train.shape[0] // pre["batch_size"])
            self._original_lrs = pretrain_lrs(pre, pre["epochs"] * parent_steps)
        self.model = sparsify(model.to(self.device))
        self.optimizer = make_optimizer(self.model.parameters(), train["optimizer"])
        mask_optimizer(self.optimizer, self.model)
        bn = train["bn_recalibration"]
        self._bn_data = None if bn is None else \
            list(self.x_train[:bn["images"]].to(self.device).split(bn["batch_size"]))
        self._parent_extras = parent_state or {}
        if not self.stacked:
            self.scheduler = self.make_scheduler(self.optimizer)
            self.pruner = self.make_pruner(self.model, self.optimizer)

    def method_context(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> MethodContext:
        """What the method's builder gets, for ``model`` and ``optimizer`` (this trial's own, or a
        stacked model's view of it and a stand-in optimizer with its learning rates)."""
        train = self.config["train"]
        schedule = train["lr_schedule"]
        return MethodContext(model, optimizer, self.config["sparsity"], self.epochs, self.steps_per_epoch,
                             self.epochs * self.steps_per_epoch, schedule if schedule != "constant" else None,
                             self._original_lrs, self._bn_data, F.cross_entropy,
                             (self.x_train[:self.batch_size].to(self.device),
                              self.y_train[:self.batch_size].to(self.device)),
                             self._parent_extras.get("init"), self.config["seed"],
                             self._parent_extras.get("snapshots"))

    def make_scheduler(self, optimizer: torch.optim.Optimizer):
        """The trial's LR schedule on ``optimizer``: a parent's pretraining schedule, or a pruning trial's
        retraining one; None for a constant LR or a method that schedules the LR itself."""
        if self.pretrain:
            stage = self.config["pretrain"]
            lrs, top = pretrain_lrs(stage, self.epochs * self.steps_per_epoch), stage["optimizer"]["lr"]
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lrs[min(t, len(lrs) - 1)] / top)
        schedule = self.config["train"]["lr_schedule"]
        if self.method.owns_lr or schedule == "constant":
            return None
        ctx = self.method_context(self.model, optimizer)
        return retrain_lr_schedule(schedule, optimizer, ctx.total_steps, **ctx.lr_options())

    def make_pruner(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """The trial's pruner on ``model`` and ``optimizer``; a parent prunes nothing (``NoPruning``)."""
        if self.pretrain:
            return NoPruning()
        return self.method.build(self.method_context(model, optimizer), **self.config["method"]["options"])

    # -- training -------------------------------------------------------------------------------

    def train_epoch(self) -> dict:
        """Train one epoch; returns its metrics (train loss, learning rate, sparsity, and the
        test metrics every ``eval_every`` epochs)."""
        started = time.perf_counter()
        on_step = self.pruner.step if self.pruner is not None else None
        if self.snapshot_steps:
            self._step, on_step = self.epoch * self.steps_per_epoch, self._after_step
        loss = train_epoch(self.model, self.optimizer, self.x_train, self.y_train, self.batch_size, self.device,
                           scheduler=self.scheduler, generator=self.generator, on_step=on_step)
        if self.pruner is not None:
            self.pruner.on_epoch_end()
        return self.end_epoch(loss, time.perf_counter() - started)

    def end_epoch(self, loss: float, seconds: float) -> dict:
        """After an epoch's training (here or in a stack) with mean training loss ``loss``, taking
        ``seconds``: count it, measure and record its metrics. A loss that is not finite (a diverged
        run) raises FloatingPointError: the trial fails rather than finish with NaN weights."""
        if not math.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss} in epoch {self.epoch + 1}: the run diverged "
                                     f"(learning rate {self.optimizer.param_groups[0]['lr']:.4g})")
        started = time.perf_counter()
        self.epoch += 1
        metrics = {"train_loss": loss, "lr": self.optimizer.param_groups[0]["lr"], "sparsity": self.sparsity()}
        if self.eval_every and self.epoch % self.eval_every == 0:
            metrics.update(evaluate_metrics(self.config["metrics"], self.model, self.x_test, self.y_test,
                                            self.device, self.parent_model()))
        self.history.append(metrics)
        self.elapsed += seconds + time.perf_counter() - started
        return metrics

    def _after_step(self) -> None:
        """A parent's step: keep the model's state after the steps in ``snapshot_steps``."""
        self._step += 1
        if self._step in self.snapshot_steps:
            self.snapshots[self._step] = snapshot(self.model)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    def parent_model(self) -> Optional[nn.Module]:
        """The dense parent this trial started from, for metrics that compare with it (built once,
        only when the sweep's metrics need it); None without a parent or without such metrics."""
        if self._parent is None and self._parent_weights is not None and needs_parent(self.config["metrics"]):
            self._parent = saved_model(self.config["model"], self._parent_weights, False, self.device)
        return self._parent

    def sparsity(self) -> float:
        return sparsity_report(self.model).sparsity if sparse_modules(self.model) else 0.0

    def result(self) -> dict:
        """Final metrics (an open dict of numbers), per-layer sparsity and the per-epoch history."""
        started = time.perf_counter()
        metrics = evaluate_metrics(self.config["metrics"], self.model, self.x_test, self.y_test, self.device,
                                   self.parent_model())
        metrics["train_loss"] = self.history[-1]["train_loss"] if self.history else float("nan")
        metrics["sparsity"] = self.sparsity()
        layers = {}
        if sparse_modules(self.model):
            layers = {layer.name: 1.0 - layer.density for layer in sparsity_report(self.model).layers}
        self.elapsed += time.perf_counter() - started
        return {"metrics": metrics, "layers": layers, "history": list(self.history), "wall_s": self.elapsed,
                "measured": list(self.config["metrics"])}

    def final_state(self) -> dict:
        """What ``model.pt`` holds: the model's state_dict (and, for a parent, the initial one and the
        ``{step: state_dict}`` snapshots when it has ``snapshot_steps``)."""
        out = {"model": self.model.state_dict()}
        if self.init_state is not None:
            out["init"] = self.init_state
        if self.snapshot_steps:
            out["snapshots"] = dict(self.snapshots)
        return out

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"trial": self.spec.id, "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "pruner": self.pruner.state_dict() if self.pruner is not None else None,
                "rng": {**capture_rng(self.generator, self.device), **self.rng_extra}, "history": list(self.history),
                "elapsed_s": self.elapsed, "threads": torch.get_num_threads(), "init": self.init_state,
                "stacked": self.stacked,
                **({"snapshots": dict(self.snapshots)} if self.snapshot_steps else {})}

    def load_state_dict(self, state: dict) -> None:
        if state.get("trial") != self.spec.id:
            raise ValueError(f"checkpoint of trial {state.get('trial')!r}, not {self.spec.id!r}")
        self.model.load_state_dict(state["model"])
        if self.pruner is not None:
            self.pruner.load_state_dict(state["pruner"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        # Last: the saved param groups carry the learning rate of the saved step.
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], self.generator, self.device)
        self.epoch, self.history, self.elapsed = state["epoch"], list(state["history"]), state["elapsed_s"]
        if state.get("init") is not None:
            self.init_state = state["init"]
        self.snapshots = dict(state.get("snapshots") or {})
