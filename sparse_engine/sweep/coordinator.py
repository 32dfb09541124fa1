"""``Sweep``: the coordinating process. Plans a sweep file, owns the store, schedules trials.

    sweep = Sweep.from_file("examples/demo.toml", overrides={"data.train_size": 2000})
    sweep.run(workers=2)                 # the local executor; executor="ray" for Ray
    records = sweep.results()            # plain dicts, one per trial

On start the coordinator takes the directory's lock, refuses a directory that holds another sweep
(unless ``force_new``), ends a torn journal line, rebuilds the SQL index from the journal and
declares the trials. Then it hands ready trials to the executor (a prune trial is ready when its
parent has finished) and follows the journal to update the index and the progress bar. Finished
trials are skipped, interrupted ones resume from their checkpoints, failed ones are skipped
unless ``retry_failed``. It is the only process that writes the index.
"""
import os
import socket
import time
from pathlib import Path
from typing import Optional, Union

from sparse_engine.sweep.executors import make_executor, pack_units
from sparse_engine.sweep.index import Index
from sparse_engine.sweep.journal import StoreError
from sparse_engine.sweep.plan import SweepPlan, plan_sweep
from sparse_engine.sweep.progress import Progress
from sparse_engine.sweep.results import SweepResults
from sparse_engine.sweep.provenance import git_sha
from sparse_engine.sweep.runner import WorkerEnv
from sparse_engine.sweep.source import SweepSource
from sparse_engine.sweep.stacked import AUTO_MAX
from sparse_engine.sweep.store import Store, load_torch
from sparse_engine.sweep.trial import measure_saved

POLL_S = 0.2
BUSY_WAIT_S = 1.0


class SweepError(RuntimeError):
    """The sweep cannot run in this directory (another sweep's, or in use)."""


class Sweep:
    """A planned sweep and its directory (module docstring)."""

    def __init__(self, plan: SweepPlan, directory: Union[str, Path, None] = None, overrides: Optional[dict] = None):
        self.plan = plan
        self.overrides = dict(overrides or {})
        self.directory = Path(directory or plan.directory or Path("runs") / plan.name)
        self.store = Store(self.directory)

    @classmethod
    def from_file(cls, path: Union[str, Path], overrides: Optional[dict] = None,
                  directory: Union[str, Path, None] = None) -> "Sweep":
        """Parse and check ``path`` (every problem raises one ``SweepFileError`` with file:line)."""
        source = SweepSource.from_file(path)
        return cls(plan_sweep(source, overrides), directory, overrides)

    @classmethod
    def from_text(cls, text: str, overrides: Optional[dict] = None, directory: Union[str, Path, None] = None,
                  name: str = "<sweep>") -> "Sweep":
        return cls(plan_sweep(SweepSource(text, name), overrides), directory, overrides)

    @property
    def trials(self) -> list:
        """Every ``TrialSpec``, parents first."""
        return list(self.plan.trials)

    # -- running ---------------------------------------------------------------------------------

    def _adopt(self, force_new: bool, settings: dict) -> None:
        """Check the directory holds this sweep (or take it over with ``force_new``) and declare
        the trials in the journal."""
        manifest = self.store.manifest()
        fingerprint = self.plan.fingerprint()
        if manifest is not None and manifest["fingerprint"] != fingerprint and not force_new:
            raise SweepError(
                f"{self.directory} holds a different sweep ({manifest.get('name')!r}, {len(manifest['trials'])} "
                f"trials, from {manifest.get('source')}); this one ({self.plan.source.name}) declares "
                f"{len(self.plan.trials)} trials, {len(set(manifest['trials']) & set(self.plan.by_id()))} of them "
                f"the same. Use another directory, or --force-new to make this directory run this file (its "
                f"finished trials with unchanged configs are kept).")
        self.store.write_manifest({"fingerprint": fingerprint, "name": self.plan.name,
                                   "source": self.plan.source.name, "overrides": self.overrides,
                                   "trials": [t.id for t in self.plan.trials], "workers": settings.get("workers")},
                                  self.plan.source.text)

    def _declare(self, index: Index) -> None:
        known = {r["id"]: r for r in index.trials()}
        for spec in self.plan.trials:
            row = known.get(spec.id)
            if row is None or row["labels"] != spec.labels or row["config"] is None:
                self.store.journal.append({"event": "declared", "trial": spec.id, "kind": spec.kind,
                                           "parent": spec.parent, "labels": spec.labels, "config": spec.config})
        self.store.journal.append({"event": "sweep", "fingerprint": self.plan.fingerprint(), "name": self.plan.name,
                                   "pid": os.getpid()})

    def run(self, executor: Optional[str] = None, *, workers: Optional[int] = None, threads: Optional[int] = None,
            address: Optional[str] = None, gpus_per_trial: Optional[float] = None,
            ray_num_cpus: Optional[int] = None, checkpoint_every: Optional[int] = None, stack: Optional[int] = None,
            retry_failed: bool = False, force_new: bool = False, progress: Optional[bool] = None) -> dict:
        """Run every trial not yet finished; returns the status (counts by state).

        Arguments left None take the sweep file's ``[run]`` values, then the defaults (the local
        executor; one worker on CPU, one per GPU on CUDA; the cores split between workers).
        ``stack``: up to this many ready prune trials that can share a stacked model
        (``TrialSpec.group_key``) are trained as one (``sweep/stacked.py``); 1: one at a time;
        ``"auto"``: up to ``stacked.AUTO_MAX``, as many as the device's memory holds, and only where
        a measured training step of the stack is faster than the same trials' steps one at a time.
        ``progress``: None shows the bar on a terminal only.
        """
        run = dict(self.plan.run)
        given = dict(executor=executor, workers=workers, threads=threads, address=address,
                     gpus_per_trial=gpus_per_trial, ray_num_cpus=ray_num_cpus, checkpoint_every=checkpoint_every,
                     stack=stack)
        run.update({k: v for k, v in given.items() if v is not None})
        if run["stack"] != "auto" and (isinstance(run["stack"], bool) or not isinstance(run["stack"], int)
                                       or run["stack"] < 1):
            raise ValueError(f'stack: expected an integer >= 1 (trials per stacked model) or "auto", got '
                             f'{run["stack"]!r}')
        device = self.plan.trials[0].config["device"]
        pool = make_executor(run["executor"], device=device, workers=run["workers"], threads=run["threads"],
                             address=run["address"], gpus_per_trial=run["gpus_per_trial"],
                             ray_num_cpus=run["ray_num_cpus"])
        self.store.create()
        lock = self.store.lock()
        if not lock.acquire():
            raise SweepError(f"{self.directory}: another runner is using this sweep directory")
        try:
            self._adopt(force_new, getattr(pool, "settings", {}))
            self.store.journal.repair()
            index = Index.build(self.store.journal, self.store.index_path)
            try:
                self._declare(index)
                self._schedule(pool, index, run, retry_failed, progress)
                self._measure_missing(index, device)
            finally:
                index.close()
        finally:
            lock.release()
        return SweepResults(self.directory).status()

    def _schedule(self, pool, index: Index, run: dict, retry_failed: bool, progress: Optional[bool]) -> None:
        journal = self.store.journal
        index = _Tail(index, journal)
        index.follow()
        by_id = self.plan.by_id()
        skip = ("done",) if retry_failed else ("done", "failed")
        state = index.states()
        todo = [t for t in self.plan.trials if state.get(t.id, "pending") not in skip]
        bar = Progress(todo, index.index, progress)
        env = WorkerEnv(str(self.directory.resolve()), checkpoint_every=run["checkpoint_every"], git_sha=git_sha(),
                        stack_auto=run["stack"] == "auto",
                        coordinator=(socket.gethostname(), os.getpid()))
        store_failure = None
        pool.start(env)
        try:
            journal.append({"event": "run", "settings": {**pool.settings, "stack": run["stack"]}, "todo": len(todo),
                            "pid": os.getpid()})
            waiting, in_flight, busy_until = list(todo), set(), {}
            while waiting or in_flight:
                # One query per round (not one per waiting trial: sweeps have hundreds).
                state = index.states()
                # A trial finished meanwhile (by a worker of a killed runner that was still
                # writing) is not run again.
                waiting = [t for t in waiting if state.get(t.id) != "done"]
                now = time.monotonic()
                ready = [t for t in waiting if (t.parent is None or state.get(t.parent) == "done")
                         and busy_until.get(t.id, 0) <= now]
                waiting_ids = {t.id for t in waiting}
                blocked = [t for t in waiting if t.parent is not None and state.get(t.parent) == "failed"
                           and t.parent not in in_flight and t.parent not in waiting_ids]
                for t in blocked:
                    journal.append({"event": "failed", "trial": t.id, "error": f"its parent {t.parent} failed",
                                    "traceback": None})
                    waiting.remove(t)
                stack = AUTO_MAX if run["stack"] == "auto" else run["stack"]
                for unit in pack_units(ready, pool.slots - len(pool.running()), stack):
                    pool.submit(unit)
                    for t in unit:
                        waiting.remove(t)
                        in_flight.add(t.id)
                for unit, outcomes in pool.poll(POLL_S):
                    for outcome in outcomes:
                        in_flight.discard(outcome["trial"])
                        if outcome.get("store_error"):
                            store_failure = outcome["error"]
                        elif outcome["state"] == "busy":
                            # Still locked by a worker of a killed runner: wait for it to end.
                            busy_until[outcome["trial"]] = time.monotonic() + BUSY_WAIT_S
                            waiting.append(by_id[outcome["trial"]])
                        elif outcome.get("crashed"):
                            journal.append({"event": "failed", "trial": outcome["trial"], "error": outcome["error"],
                                            "traceback": None})
                    if store_failure is not None:
                        raise StoreError(28, store_failure)
                bar.update(index.follow(), pool.running())
        finally:
            pool.shutdown()
            bar.update(index.follow(final=True), {})
            bar.close()

    def _measure_missing(self, index: Index, device: str) -> None:
        """Measure the sweep's metrics that finished trials have not (a metric added to the file
        after they ran) on their final models, and merge them into their results."""
        tail = _Tail(index, self.store.journal)
        tail.follow()
        rows = {r["id"]: r for r in index.trials([t.id for t in self.plan.trials])}
        for spec in self.plan.trials:
            row = rows.get(spec.id)
            if row is None or row["state"] != "done":
                continue
            measured = row.get("measured") or (row["config"] or {}).get("metrics") or []
            missing = [n for n in spec.config["metrics"] if n not in measured]
            if not missing:
                continue
            path = self.store.model(spec.id)
            if not path.exists():
                raise SweepError(f"trial {spec.id} is done but its final model {path} is missing: cannot measure "
                                 f"{', '.join(missing)}; delete the trial's directory to train it again")
            parent = None
            if spec.parent is not None and self.store.model(spec.parent).exists():
                parent = load_torch(self.store.model(spec.parent))
            values = measure_saved(spec, missing, load_torch(path), parent, device)
            self.store.journal.append({"event": "evaluated", "trial": spec.id, "metrics": values, "measured": missing})
        tail.follow()

    # -- results ---------------------------------------------------------------------------------

    def results(self, with_history: bool = False) -> list[dict]:
        """Plain records of every trial (``SweepResults.records``); empty before the first run."""
        if not self.store.exists():
            return []
        return SweepResults(self.directory).records(with_history)

    def status(self) -> dict:
        return SweepResults(self.directory).status()


class _Tail:
    """The index, kept up to date with the journal as workers append to it."""

    def __init__(self, index: Index, journal):
        self.index, self.journal = index, journal
        self.offset = index.journal_offset()

    def follow(self, final: bool = False) -> list:
        """Apply the journal's new events to the index; returns them. Nothing new, nothing written
        (the coordinator polls several times a second)."""
        events, offset = self.journal.read(self.offset, final=final)
        if offset != self.offset:
            self.offset = offset
            self.index.apply(events, offset)
        return events

    def states(self) -> dict[str, str]:
        return self.index.states()
