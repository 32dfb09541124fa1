"""Running trials in a worker, whatever the executor: resume, record, checkpoint.

The executor interface (see ``executors/base.py``) hands a worker a **unit**, a list of trials
that share ``TrialSpec.group_key()`` (one trial unless the sweep runs with ``stack`` > 1).
:func:`run_unit` runs it with the unit runner registered for its size: :func:`run_trials_one_by_one`
for one trial, ``stacked.run_stacked`` (the unit trained as one stacked model) for more.

Whatever trains them, every trial is recorded through its own :class:`TrialRecorder`:

* ``started(checkpoint)`` before it is built (and resumed from its checkpoint, if any);
* ``epoch_done(trial, metrics)`` after each epoch: writes the checkpoint (every
  ``checkpoint_every`` epochs and after the last), then appends the ``epoch`` event;
* ``finished(trial)``: writes ``model.pt``, appends ``finished`` (final metrics, history, wall
  time, device, threads, versions), removes the checkpoint;
* ``failed(error)``: appends ``failed`` with the traceback.

``trial`` is anything with the attributes :class:`sparse_engine.sweep.trial.Trial` has for these
(``spec``, ``epoch``, ``epochs``, ``state_dict()``, ``result()``, ``final_state()``), so a stacked
runner can pass per-trial views of its batched model.
"""
import dataclasses
import os
import socket
import threading
import traceback
import warnings
from typing import Callable, Optional

import torch

from sparse_engine.ops import dispatch
from sparse_engine.sweep.journal import StoreError
from sparse_engine.sweep.provenance import git_sha, library_version
from sparse_engine.sweep.plan import TrialSpec
from sparse_engine.sweep.store import Store, load_torch, save_torch
from sparse_engine.sweep.trial import Trial


@dataclasses.dataclass(frozen=True)
class WorkerEnv:
    """What a worker needs besides the trials: the store, its device and thread count, its name."""
    directory: str
    device: str = "cpu"
    threads: Optional[int] = None
    checkpoint_every: int = 1
    worker: str = "w0"
    git_sha: Optional[str] = None
    coordinator: Optional[tuple] = None  # (hostname, pid) of the coordinating process
    stack_auto: bool = False  # units of several trials: stack them only where it measures faster


def coordinator_gone(env: WorkerEnv) -> bool:
    """True when the coordinator ran on this host and its process is gone (a killed runner)."""
    if env.coordinator is None or env.coordinator[0] != socket.gethostname():
        return False
    try:
        os.kill(env.coordinator[1], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def exit_if_orphaned(env: WorkerEnv) -> None:
    """A worker whose runner was killed writes nothing more: the next runner owns the store."""
    if coordinator_gone(env):
        os._exit(1)


class Watchdog:
    """Ends this worker process within ``interval`` s of its coordinator's death, even in the middle
    of an epoch (Ray kills a dead driver's workers only after a while; the local pool's workers
    die at once by PR_SET_PDEATHSIG)."""

    def __init__(self, env: WorkerEnv, interval: float = 0.1):
        self.env, self.interval = env, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="sweep-watchdog")

    def _watch(self) -> None:
        while not self.stopped.wait(self.interval):
            exit_if_orphaned(self.env)

    def __enter__(self):
        if self.env.coordinator is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()


_shared_choices: dict = {}  # sweep directory -> the dispatch choices this process has written to its dispatch.json


def share_dispatch_choices(store: Store) -> None:
    """Record the masked ops' implementation choices this process measured (``ops.dispatch``) in the sweep
    directory, where a resumed trial finds them (:func:`load_dispatch_choices`): measurement on another
    process could choose otherwise, and the implementations differ in the last bits."""
    choices = dispatch.choices()
    shared = _shared_choices.setdefault(str(store.dir.resolve()), {})
    if choices.items() - shared.items():
        store.share_dispatch_choices(choices)
        shared.update(choices)


def load_dispatch_choices(store: Store) -> None:
    """Use the choices recorded in the sweep directory (those this process has not made itself)."""
    if store.dispatch_path.exists():
        dispatch.load(store.dispatch_path, keep_mine=True)  # a choice already used here is kept


class TrialRecorder:
    """Records one trial's progress in the store (module docstring)."""

    def __init__(self, store: Store, spec: TrialSpec, env: WorkerEnv):
        self.store, self.spec, self.env = store, spec, env

    def _append(self, event: str, **fields) -> None:
        exit_if_orphaned(self.env)
        self.store.journal.append({"event": event, "trial": self.spec.id, **fields})

    def checkpoint(self) -> Optional[dict]:
        """The trial's last checkpoint, or None."""
        path = self.store.checkpoint(self.spec.id)
        return load_torch(path) if path.exists() else None

    def started(self, checkpoint: Optional[dict], **fields) -> None:
        """Before the trial is built: from which epoch it goes on (its checkpoint's, or 0), and
        ``fields`` (``stacked``: the size of the unit it trains in)."""
        saved = {"from_epoch": 0} if checkpoint is None else {"from_epoch": checkpoint["epoch"],
                                                             "checkpoint_threads": checkpoint.get("threads")}
        self._append("started", **saved, worker=self.env.worker, pid=os.getpid(), threads=torch.get_num_threads(),
                     device=self.env.device, **fields)

    def epoch_done(self, trial, metrics: dict) -> None:
        if trial.epoch % self.env.checkpoint_every == 0 or trial.epoch >= trial.epochs:
            exit_if_orphaned(self.env)
            share_dispatch_choices(self.store)  # before the checkpoint that computed with them
            save_torch(trial.state_dict(), self.store.checkpoint(self.spec.id))
        self._append("epoch", epoch=trial.epoch, metrics=metrics)

    def finished(self, trial) -> dict:
        result = trial.result()
        save_torch(trial.final_state(), self.store.model(self.spec.id))
        self._append("finished", **result, device=str(trial.device), threads=torch.get_num_threads(),
                     version=library_version(), git_sha=self.env.git_sha or git_sha())
        self.store.checkpoint(self.spec.id).unlink(missing_ok=True)
        return result

    def failed(self, error: BaseException) -> None:
        self._append("failed", error=f"{type(error).__name__}: {error}",
                     traceback="".join(traceback.format_exception(error)))


def build_trial(spec: TrialSpec, store: Store, env: WorkerEnv, stacked: bool = False) -> Trial:
    parent = None
    if spec.parent is not None:
        path = store.model(spec.parent)
        if not path.exists():
            raise FileNotFoundError(f"the parent {spec.parent} has no final model at {path} (did it finish?)")
        parent = load_torch(path)
    return Trial(spec, env.device, parent, stacked=stacked)


def run_trial(spec: TrialSpec, env: WorkerEnv, **started) -> dict:
    """Run (or resume) one trial to its end in this process; returns ``{"trial", "state", "error"}``.

    The trial's lock is held throughout: if another live process holds it, nothing is run.
    ``started``: more fields of its ``started`` event.
    """
    store = Store(env.directory)
    lock = store.trial_lock(spec.id)
    if not lock.acquire():
        return {"trial": spec.id, "state": "busy", "error": "another process is running this trial"}
    recorder = TrialRecorder(store, spec, env)
    try:
        saved = recorder.checkpoint()
        recorder.started(saved, **started)
        trial = build_trial(spec, store, env)
        if saved is not None:
            trial.load_state_dict(saved)
            if saved.get("threads") != torch.get_num_threads():
                warnings.warn(f"trial {spec.id}: resumed with {torch.get_num_threads()} threads, checkpointed with "
                              f"{saved.get('threads')}; CPU results can differ in the last bits", RuntimeWarning)
        while not trial.finished:
            metrics = trial.train_epoch()
            recorder.epoch_done(trial, metrics)
        recorder.finished(trial)
        return {"trial": spec.id, "state": "done", "error": None}
    except StoreError as e:
        return {"trial": spec.id, "state": "failed", "error": str(e), "store_error": True}
    except Exception as e:  # noqa: BLE001 - a trial's failure is recorded; the sweep goes on
        try:
            recorder.failed(e)
        except StoreError as store_error:
            return {"trial": spec.id, "state": "failed", "error": str(store_error), "store_error": True}
        return {"trial": spec.id, "state": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        lock.release()


def run_trials_one_by_one(unit: list, env: WorkerEnv, **started) -> list:
    return [run_trial(spec, env, **started) for spec in unit]


def run_stacked(unit: list, env: WorkerEnv) -> list:
    from sparse_engine.sweep.stacked import run_stacked as run  # it imports this module
    return run(unit, env)


# Unit runners by minimum unit size: the largest key <= len(unit) runs it.
UNIT_RUNNERS: dict[int, Callable[[list, WorkerEnv], list]] = {1: run_trials_one_by_one, 2: run_stacked}


def run_unit(unit: list, env: WorkerEnv) -> list:
    """The worker's entry point: run a unit of trials, one outcome per trial."""
    if env.threads is not None and torch.get_num_threads() != env.threads:
        torch.set_num_threads(env.threads)
    if env.device.startswith("cuda") and ":" in env.device:
        torch.cuda.set_device(torch.device(env.device))
    size = max(k for k in UNIT_RUNNERS if k <= max(len(unit), 1))
    load_dispatch_choices(Store(env.directory))
    with Watchdog(env):
        return UNIT_RUNNERS[size](unit, env)
