"""The ``ray`` executor: the same units as Ray Core tasks, for sweeps that outgrow one machine.

Each unit is one task of ``runner.run_unit`` with ``num_cpus = threads`` and ``num_gpus =
gpus_per_trial * len(unit)`` (fractions allowed: Ray's GPU fractions are logical, so the trials that
share a GPU must fit in its memory together). Tasks are not retried by Ray (``max_retries=0``):
the coordinator records a crashed task's trials as failed, and ``--retry-failed`` or a rerun
resumes them from their checkpoints.

Workers write checkpoints and journal events into the sweep directory themselves, so on a
cluster it must be on a file system that every node mounts (NFS and the like; the journal's
``lockf`` locks keep lines whole there too). ``address=None`` starts a local Ray instance with
``num_cpus`` CPUs (default: all), ``"auto"`` or ``"ray://host:10001"`` joins a running cluster.
Ray is an optional dependency: ``pip install sparse_engine[ray]``.
"""
import dataclasses
from typing import Optional

from sparse_engine.sweep.executors.base import Executor, crashed
from sparse_engine.sweep.runner import WorkerEnv, run_unit


def import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("the ray executor needs Ray: pip install 'sparse_engine[ray]'") from None
    return ray


class RayExecutor(Executor):
    """Units as Ray tasks (module docstring). ``workers`` caps the tasks in flight (default: as
    many as the cluster's CPUs allow at ``threads`` each)."""
    name = "ray"

    def __init__(self, address: Optional[str] = None, workers: Optional[int] = None, threads: Optional[int] = None,
                 gpus_per_trial: Optional[float] = None, num_cpus: Optional[int] = None, device: str = "cpu"):
        self.ray = import_ray()
        self.address, self.num_cpus, self.device = address, num_cpus, device
        self.threads = threads or 1
        self.gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if device.startswith("cuda") else 0.0)
        if self.gpus < 0:
            raise ValueError(f"gpus_per_trial: expected a number >= 0, got {self.gpus}")
        self.workers = workers
        self.owns_ray = False
        self._refs: dict = {}
        self._env: Optional[WorkerEnv] = None
        self._task = None
        self.slots = 0
        self.settings = {}

    def start(self, env: WorkerEnv) -> None:
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address, num_cpus=self.num_cpus if self.address is None else None,
                     include_dashboard=False, log_to_driver=False, configure_logging=False)
            self.owns_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = self.workers or max(1, cpus // self.threads)
        self._env = dataclasses.replace(env, device="cuda" if self.device.startswith("cuda") else "cpu",
                                        threads=self.threads, worker="ray")
        self._task = ray.remote(max_retries=0)(run_unit)
        self.settings = {"executor": self.name, "workers": self.slots, "threads": self.threads,
                         "gpus_per_trial": self.gpus, "address": self.address, "device": self.device,
                         "cluster_cpus": cpus}

    def submit(self, unit: list) -> None:
        ref = self._task.options(num_cpus=self.threads, num_gpus=self.gpus * len(unit)).remote(unit, self._env)
        self._refs[ref] = unit

    def poll(self, timeout: float) -> list:
        if not self._refs:
            return []
        ready, _ = self.ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            unit = self._refs.pop(ref)
            try:
                done.append((unit, self.ray.get(ref)))
            except self.ray.exceptions.RayError as e:
                done.append((unit, crashed(unit, f"Ray task failed: {type(e).__name__}: {e}")))
        return done

    def running(self) -> dict:
        return {f"ray{i}": unit for i, unit in enumerate(self._refs.values())}

    def shutdown(self) -> None:
        for ref in self._refs:
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        if self.owns_ray:
            self.ray.shutdown()
            self.owns_ray = False
