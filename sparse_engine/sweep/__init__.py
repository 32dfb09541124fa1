"""Pruning sweeps: a resumable sweep runner with an embedded store, reports, plots, and Ray.

    from sparse_engine.sweep import Sweep
    sweep = Sweep.from_file("examples/demo.toml")
    sweep.run()                          # or `python -m sparse_engine.sweep run examples/demo.toml`
    print(report_table(sweep.results()))

Layout: the sweep file (``source.py``, ``fields.py``, ``settings.py``), trial ids and the grid
(``plan.py``), methods, models, data and metrics by name (``methods.py``, ``components.py``,
``metrics.py``), what a trial is (``trial.py``) and how a worker records it (``runner.py``), the
store (``store.py``, ``journal.py``, ``index.py``), executors (``executors/``: ``local``, ``ray``),
the coordinator (``coordinator.py``), reading results (``results.py``, ``report.py``,
``plot.py``) and the CLI (``cli.py``).
"""
from sparse_engine.sweep.coordinator import Sweep, SweepError
from sparse_engine.sweep.executors import Executor, LocalExecutor, RayExecutor, make_executor, pack_units
from sparse_engine.sweep.journal import StoreError
from sparse_engine.sweep.methods import METHODS, Method, MethodContext, register_method
from sparse_engine.sweep.metrics import METRICS, Metric, register_metric
from sparse_engine.sweep.plan import TrialSpec, config_id, plan_sweep
from sparse_engine.sweep.plot import plot_sweep
from sparse_engine.sweep.report import aggregate, report_table
from sparse_engine.sweep.results import SweepResults
from sparse_engine.sweep.runner import UNIT_RUNNERS, TrialRecorder, WorkerEnv, run_trial, run_unit
from sparse_engine.sweep.source import SweepFileError, SweepSource
from sparse_engine.sweep.trial import Trial

__all__ = [
    "Sweep", "SweepError", "SweepFileError", "StoreError", "SweepSource", "SweepResults", "plan_sweep", "TrialSpec",
    "config_id", "Trial", "TrialRecorder", "WorkerEnv", "run_trial", "run_unit", "UNIT_RUNNERS", "Executor",
    "LocalExecutor", "RayExecutor", "make_executor", "pack_units", "METHODS", "Method", "MethodContext",
    "register_method", "METRICS", "Metric", "register_metric", "report_table", "aggregate", "plot_sweep",
]
