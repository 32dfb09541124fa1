"""Executors: how trials are run. ``local`` (worker processes) and ``ray`` (Ray Core tasks)."""
from typing import Optional

from sparse_engine.sweep.executors.base import Executor, pack_units
from sparse_engine.sweep.executors.local import InProcessExecutor, LocalExecutor
from sparse_engine.sweep.executors.ray_executor import RayExecutor

EXECUTORS = ("local", "ray")


def make_executor(name: str, *, device: str = "cpu", workers: Optional[int] = None, threads: Optional[int] = None,
                  address: Optional[str] = None, gpus_per_trial: Optional[float] = None,
                  ray_num_cpus: Optional[int] = None) -> Executor:
    """The executor called ``name`` with the run settings given (``settings.RUN_FIELDS``)."""
    if name == "local":
        if address is not None or gpus_per_trial is not None or ray_num_cpus is not None:
            raise ValueError("address/gpus_per_trial/ray_num_cpus: only the ray executor takes them")
        return InProcessExecutor(threads, device) if workers == 0 else LocalExecutor(workers, threads, device)
    if name == "ray":
        return RayExecutor(address, workers, threads, gpus_per_trial, ray_num_cpus, device)
    raise ValueError(f"executor: expected one of {EXECUTORS}, got {name!r}")


__all__ = ["Executor", "LocalExecutor", "InProcessExecutor", "RayExecutor", "make_executor", "pack_units", "EXECUTORS"]
