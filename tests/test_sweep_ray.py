"""The ray executor on a local Ray instance (``ray.init(num_cpus=2)``): a run killed with -9
mid-trial and resumed gives the uninterrupted results; failed and crashed trials are recorded.
Ray starts slowly: one instance for this module's in-process runs, one in the killed subprocess."""
import os

import pytest
import ray

import sweep_helpers as h
from sparse_engine.sweep import Sweep


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return h.data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) whose workers can import tests/sweep_helpers.py."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = h.env_with_tests_path()["PYTHONPATH"]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    yield
    ray.shutdown()


def test_ray_kill_9_and_resume_gives_the_uninterrupted_results(tmp_path, tmp_path_factory, data, local_ray):
    text = h.tiny_sweep_text(data, h.SLOW_METHOD)
    reference = h.baseline(tmp_path_factory, text, "slow")  # in process, no Ray: the results must be the same
    sweep_file = tmp_path / "tiny.toml"
    sweep_file.write_text(text)
    directory = tmp_path / "run"
    proc = h.start_run(sweep_file, directory, "--executor", "ray", "--ray-num-cpus", "2", "--threads", "1")
    seen = h.kill_when(proc, directory, h.mid_trial("prune"))
    # Ray's workers (and the local instance the runner started) die with it
    h.assert_processes_gone({e["pid"] for e in seen if e["event"] == "started"}, timeout=30)
    interrupted = h.mid_trial_ids(seen, "prune")
    status = Sweep.from_file(sweep_file, directory=directory).run("ray", threads=1, progress=False)
    assert (status["done"], status["failed"]) == (6, 0)
    started = [e for e in h.events(directory) if e["event"] == "started"]
    assert any(e["trial"] in interrupted and e["from_epoch"] >= 1 for e in started)
    h.assert_same_results(directory, reference)
    run = [e for e in h.events(directory) if e["event"] == "run"][-1]["settings"]
    assert run["executor"] == "ray" and run["threads"] == 1 and run["workers"] == 2


def test_ray_records_failed_and_crashed_trials(tmp_path, data, local_ray):
    methods = h.TWO_METHODS + '[methods.bad]\nname = "sweep_helpers:explode"\nwhen = "step"\n' \
        '[methods.dies]\nname = "sweep_helpers:die"\n'
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]").replace(
        "sparsity = [0.5, 0.8]", "sparsity = [0.5]")
    status = Sweep.from_text(text, directory=tmp_path).run("ray", threads=1, progress=False)
    assert (status["done"], status["failed"]) == (3, 2)
    records = {r["method"]: r for r in Sweep.from_text(text, directory=tmp_path).results()}
    assert records["bad"]["error"] == "FloatingPointError: boom at step" and "Traceback" in records["bad"]["traceback"]
    assert records["dies"]["error"].startswith("Ray task failed:")
    assert records["GMP"]["state"] == "done" and records["GMP"]["metrics"]["test_accuracy"] > 0
