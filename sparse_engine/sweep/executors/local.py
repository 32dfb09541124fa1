"""The ``local`` executor: a pool of worker processes on this machine, one per device slot.

Workers are started with ``spawn`` (no inherited threads or CUDA state) and each owns its slot:
on CUDA worker ``i`` uses ``cuda:i``; on CPU there is one worker by default and the cores are split
between workers (``torch.set_num_threads``), fixed for the whole run and recorded, since CPU float
results can depend on the thread count. On Linux a worker is killed with its coordinator
(``PR_SET_PDEATHSIG``): a ``kill -9`` of the runner leaves no orphan training in the store.

Each worker has its own inbox, so the coordinator knows which unit a dead worker was running;
the worker is replaced and the unit's trials are reported as crashed.
"""
import ctypes
import dataclasses
import multiprocessing as mp
import os
import queue
import signal
import sys
from typing import Optional

import torch

from sparse_engine.sweep.executors.base import Executor, crashed, default_threads
from sparse_engine.sweep.runner import WorkerEnv, run_unit

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(env: WorkerEnv, parent: int, inbox, outbox) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(env.threads)
    if env.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(env.device))
    while True:
        unit = inbox.get()
        if unit is None:
            return
        outbox.put((env.worker, run_unit(unit, env)))


class InProcessExecutor(Executor):
    """``workers=0``: trials run one by one in the coordinating process itself (no pool: for
    debugging with pdb, notebooks and tests), with ``threads`` torch threads."""
    name = "local"

    def __init__(self, threads: Optional[int] = None, device: str = "cpu"):
        self.slots, self.device = 1, device
        self.threads = default_threads(1, threads)
        self.settings = {"executor": self.name, "workers": 0, "threads": self.threads, "device": device}
        self._unit = self._env = None

    def start(self, env: WorkerEnv) -> None:
        self._env = dataclasses.replace(env, worker="main", threads=self.threads, device=self.device)

    def submit(self, unit: list) -> None:
        self._unit = unit

    def poll(self, timeout: float) -> list:
        if self._unit is None:
            return []
        unit, self._unit = self._unit, None
        threads = torch.get_num_threads()
        try:
            return [(unit, run_unit(unit, self._env))]
        finally:
            torch.set_num_threads(threads)

    def running(self) -> dict:
        return {"main": self._unit} if self._unit is not None else {}

    def shutdown(self) -> None:
        self._unit = None


class LocalExecutor(Executor):
    """``workers`` processes (default: one per GPU with ``device="cuda"``, else one) of
    ``threads`` torch threads each (default: the usable cores split between them)."""
    name = "local"

    def __init__(self, workers: Optional[int] = None, threads: Optional[int] = None, device: str = "cpu"):
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise RuntimeError("device cuda: no CUDA device is available")
            workers = workers or torch.cuda.device_count()
        workers = 1 if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers: expected at least 1 (or 0: in this process), got {workers}")
        self.device = device
        self.slots = workers
        self.threads = default_threads(workers, threads)
        self.settings = {"executor": self.name, "workers": workers, "threads": self.threads, "device": device}
        self._ctx = mp.get_context("spawn")
        self._procs: dict = {}
        self._inboxes: dict = {}
        self._busy: dict = {}
        self._outbox = None
        self._env: Optional[WorkerEnv] = None

    def _slot_device(self, i: int) -> str:
        if self.device == "cuda":
            return f"cuda:{i % torch.cuda.device_count()}"
        return self.device

    def _spawn(self, i: int) -> None:
        name = f"w{i}"
        env = dataclasses.replace(self._env, worker=name, threads=self.threads, device=self._slot_device(i))
        inbox = self._ctx.Queue()
        proc = self._ctx.Process(target=_worker_main, args=(env, os.getpid(), inbox, self._outbox), daemon=True,
                                 name=f"sparse-engine-sweep-{name}")
        proc.start()
        self._procs[name], self._inboxes[name] = proc, inbox
        self._busy[name] = None

    def start(self, env: WorkerEnv) -> None:
        self._env = env
        self._outbox = self._ctx.Queue()
        for i in range(self.slots):
            self._spawn(i)

    def submit(self, unit: list) -> None:
        name = next(n for n, u in self._busy.items() if u is None)
        self._busy[name] = unit
        self._inboxes[name].put(unit)

    def poll(self, timeout: float) -> list:
        done = []
        try:
            name, outcomes = self._outbox.get(timeout=timeout)
            done.append((self._busy[name], outcomes))
            self._busy[name] = None
        except queue.Empty:
            pass
        for name, proc in list(self._procs.items()):
            if not proc.is_alive():
                unit = self._busy[name]
                if unit is not None:
                    done.append((unit, crashed(unit, f"worker process {name} died (exit code {proc.exitcode})")))
                self._spawn(int(name[1:]))
        return done

    def running(self) -> dict:
        return {n: u for n, u in self._busy.items() if u is not None}

    def shutdown(self) -> None:
        # Idle workers have nothing to finish, and a busy one (after an error or Ctrl-C) is safe to
        # stop anywhere: every file it writes is replaced atomically, and its trial resumes later.
        for proc in self._procs.values():
            if proc.is_alive():
                proc.kill()
        for proc in self._procs.values():
            proc.join(timeout=30)
        self._procs.clear()
