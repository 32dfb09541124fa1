"""The executor interface: how trials are run (``trial.py`` says what a trial is).

The coordinator (``sweep.py``) decides which trials are ready (a prune trial waits for its parent)
and hands them to an executor in **units**: lists of ``TrialSpec`` that share
``TrialSpec.group_key()`` (architecture, data, batch size, step count, device, optimizer settings
other than learning rate and weight decay, and a method that can run stacked). Model stacking
works at two places:

1. the coordinator packs up to ``stack`` ready trials with equal ``group_key()`` into one unit
   (:func:`pack_units`; ``Sweep.run(stack=K)``, ``--stack K`` or ``[run] stack = K``; 1 by
   default: every unit one trial);
2. a worker runs a unit with ``runner.run_unit``, which picks the unit runner registered in
   ``runner.UNIT_RUNNERS`` for the unit's size: ``stacked.run_stacked`` for sizes >= 2 trains
   the unit as one batched model and still records every trial through its own
   ``runner.TrialRecorder`` (started / epoch_done with a per-trial checkpoint / finished /
   failed), so each trial is checkpointed, resumed and reported as its own.

An executor implements:

``start(env)``
    start workers; ``env`` is the ``runner.WorkerEnv`` template (store directory, device,
    checkpoint interval); the executor fills in ``worker``, ``threads`` and the device slot.
``slots``
    how many units may run at once.
``submit(unit)``
    start a unit on a free slot (never called with no slot free).
``poll(timeout) -> [(unit, outcomes)]``
    units that ended within ``timeout`` seconds, with one outcome per trial,
    ``{"trial", "state": "done" | "failed" | "busy", "error"}``; a worker that died is reported
    as ``failed`` outcomes with ``"crashed": True`` (the coordinator records them).
``running() -> {worker: unit}``
    what each worker runs now (for the progress display).
``settings``
    a dict of what decides results or speed (executor, workers, threads, ...), recorded in the
    journal.
``shutdown()``
    stop the workers (also after an error).
"""
from abc import ABC, abstractmethod
from typing import Optional

from sparse_engine.sweep.runner import WorkerEnv


def usable_cores() -> int:
    import os
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(workers: int, threads: Optional[int]) -> int:
    """``threads``, or the usable cores split evenly between ``workers`` (at least 1)."""
    return threads if threads is not None else max(1, usable_cores() // workers)


def pack_units(ready: list, free_slots: int, stack: int = 1) -> list:
    """Up to ``free_slots`` units of at most ``stack`` ready trials with equal ``group_key()``,
    in the order the trials are ready."""
    units: list = []
    open_units: dict = {}
    for spec in ready:
        key = spec.group_key()
        unit = open_units.get(key)
        if unit is not None and len(unit) < stack:
            unit.append(spec)
            continue
        if len(units) == free_slots:
            continue
        unit = [spec]
        units.append(unit)
        open_units[key] = unit
    return units


class Executor(ABC):
    """Runs units of trials (module docstring)."""
    name = "executor"
    settings: dict
    slots: int

    @abstractmethod
    def start(self, env: WorkerEnv) -> None: ...

    @abstractmethod
    def submit(self, unit: list) -> None: ...

    @abstractmethod
    def poll(self, timeout: float) -> list: ...

    @abstractmethod
    def running(self) -> dict: ...

    @abstractmethod
    def shutdown(self) -> None: ...


def crashed(unit: list, why: str) -> list:
    return [{"trial": spec.id, "state": "failed", "error": why, "crashed": True} for spec in unit]
