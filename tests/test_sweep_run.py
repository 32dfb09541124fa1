"""Running sweeps with the local executor: exact resume (in process and after kill -9), failed
trials, the store's faults, reports and plots. Tiny model, small IDX files, few steps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sweep_helpers as h
from sparse_engine.sweep import StoreError, Sweep, SweepError, SweepFileError, SweepResults, report_table
from sparse_engine.sweep.cli import main
from sparse_engine.sweep.runner import WorkerEnv
from sparse_engine.sweep.store import Store, save_torch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return h.data_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> Path:
    """An uninterrupted run of the tiny sweep (2 parents, 8 pruning trials)."""
    return h.baseline(tmp_path_factory, h.tiny_sweep_text(data), "two-methods")


def every_method_text(data: Path) -> str:
    methods = "".join(f'[methods.{m}]\nname = "{m}"\n' for m in ("one_shot", "gmp", "fggp", "cyclical"))
    methods += '[methods.imp-slr]\nname = "imp"\nlr_schedule = "slr"\nphases = 2\n'
    methods += '[methods.one-shot-random]\nname = "one_shot"\nscore = "random"\n'
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [3]")
    text = text.replace("sparsity = [0.5, 0.8]", "sparsity = [0.7]").replace("train_size = 384", "train_size = 192")
    return text.replace('name = "second_order_mlp"', 'name = "fashion_cnn"').replace("epochs = 3", "epochs = 2")


def test_resume_from_any_epoch_is_exact_for_every_method(tmp_path, data):
    """In process: a trial rebuilt from its spec and given its epoch-k state ends exactly as the
    uninterrupted trial (weights, masks, metrics), for the parent and every built-in method."""
    sweep = Sweep.from_text(every_method_text(data), directory=tmp_path)
    store, env = Store(tmp_path), WorkerEnv(str(tmp_path))
    store.create()
    torch.set_num_threads(1)
    for spec in sweep.trials:  # parents first
        a, final = h.assert_resume_exact(spec, store, env, tmp_path / "state.pt")
        if spec.kind == "pretrain":
            save_torch(final, store.model(spec.id))
        else:
            assert abs(a["metrics"]["sparsity"] - spec.config["sparsity"]) < 1e-3, spec.describe()


def test_run_records_results_and_skips_finished_trials(reference, data):
    records = SweepResults(reference).records(with_history=True)
    assert len(records) == 10 and all(r["state"] == "done" for r in records)
    for r in records:
        assert {"test_accuracy", "test_loss", "train_loss", "sparsity"} <= set(r["metrics"])
        assert r["threads"] == 1 and r["device"] == "cpu" and r["version"] and r["git_sha"] and r["wall_s"] > 0
        assert len(r["history"]) == r["config"]["pretrain" if r["kind"] == "pretrain" else "train"]["epochs"]
        if r["kind"] == "prune":
            n = 784 * 40 + 40 * 20 + 20 * 10
            assert r["metrics"]["sparsity"] == round(r["sparsity"] * n) / n
            assert set(r["layers"]) == {"1", "3", "5"} and "test_accuracy" in r["history"][0]
    # running the same file again runs nothing
    before = h.events(reference)
    h.run_here(h.tiny_sweep_text(data), reference)
    new = h.events(reference)[len(before):]
    assert not [e for e in new if e["event"] in ("started", "epoch", "finished")]


def test_a_metric_added_later_is_measured_on_the_finished_models_without_training(tmp_path, reference, data):
    import shutil
    directory = tmp_path / "sweep"
    shutil.copytree(reference, directory)
    before = {r["id"]: r for r in SweepResults(directory).records()}
    text = h.tiny_sweep_text(data).replace('metrics = ["accuracy", "loss"]',
                                           'metrics = ["accuracy", "loss", "beyond_accuracy"]')
    n = len(h.events(directory))
    h.run_here(text, directory)
    new = h.events(directory)[n:]
    assert not [e for e in new if e["event"] in ("started", "epoch", "finished")], "a finished trial was trained"
    assert sorted(e["trial"] for e in new if e["event"] == "evaluated") == sorted(before)
    after = {r["id"]: r for r in SweepResults(directory).records()}
    for i, r in after.items():
        m = r["metrics"]
        # the saved model, masks included, is the one that was trained: the same clean accuracy
        assert m["accuracy"] == pytest.approx(before[i]["metrics"]["test_accuracy"], abs=1e-12), i
        assert {k: m[k] for k in before[i]["metrics"]} == before[i]["metrics"]
        assert 0.0 <= m["ece"] <= 1.0 and "noise_acc_mean" in m
        if r["kind"] == "prune":
            parent = after[r["parent"]]["metrics"]
            assert m["dense_accuracy"] == parent["accuracy"] and 0.0 <= m["agreement"] <= 1.0
        else:
            assert "agreement" not in m
    n = len(h.events(directory))
    h.run_here(text, directory)
    assert not [e for e in h.events(directory)[n:] if e["event"] == "evaluated"], "measured twice"


def test_kill_9_and_resume_gives_the_uninterrupted_results(tmp_path, tmp_path_factory, data):
    text = h.tiny_sweep_text(data, h.SLOW_METHOD)
    reference = h.baseline(tmp_path_factory, text, "slow")
    sweep_file = tmp_path / "tiny.toml"
    sweep_file.write_text(text)
    directory = tmp_path / "run"
    # Killed after the first pruning trial's first epoch (its checkpoint written), mid-trial.
    seen = h.kill_when(h.start_run(sweep_file, directory, "--threads", "1"), directory, h.mid_trial("prune"))
    h.assert_processes_gone({e["pid"] for e in seen if e["event"] == "started"})
    killed = h.mid_trial_ids(seen, "prune")[0]
    done = subprocess.run([sys.executable, "-m", "sparse_engine.sweep", "run", str(sweep_file), "--dir",
                           str(directory), "--threads", "1", "--quiet"], cwd=h.REPO, env=h.env_with_tests_path(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = [e for e in h.events(directory) if e["event"] == "started" and e["trial"] == killed]
    assert resumed[-1]["from_epoch"] >= 1  # continued from its checkpoint, not from scratch
    h.assert_same_results(directory, reference)
    assert "6 done, 0 failed" in done.stdout


def test_failed_trials_are_recorded_and_retried(tmp_path, data, capsys):
    methods = h.TWO_METHODS + '[methods.bad-build]\nname = "sweep_helpers:explode"\n' \
                              '[methods.bad-step]\nname = "sweep_helpers:explode"\nwhen = "step"\n'
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    status = h.run_here(text, tmp_path)
    assert (status["done"], status["failed"]) == (5, 4)

    def failed():
        return [r for r in sweep.results() if r["state"] == "failed"]
    assert {r["method"] for r in failed()} == {"bad-build", "bad-step"}
    for r in failed():
        boom = "RuntimeError: boom at build" if r["method"] == "bad-build" else "FloatingPointError: boom at step"
        assert r["error"] == boom and "Traceback" in r["traceback"] and "sweep_helpers.py" in r["traceback"]
    assert all(r["metrics"]["test_accuracy"] > 0 for r in sweep.results() if r["state"] == "done")
    # a rerun skips them; --retry-failed runs them again (and they fail again)
    assert h.run_here(text, tmp_path)["failed"] == 4
    assert [r["attempts"] for r in failed()] == [1] * 4
    h.run_here(text, tmp_path, retry_failed=True)
    assert [r["attempts"] for r in failed()] == [2] * 4
    assert main(["report", str(tmp_path), "--failures"]) == 0
    out = capsys.readouterr().out
    assert "FloatingPointError: boom at step" in out and "| mlp | GMP |" in out


def test_report_and_plot_files(tmp_path, reference, capsys):
    records = SweepResults(reference).records()
    table = report_table(records)
    rows = [r for r in records if r["kind"] == "prune" and r["method"] == "GMP" and r["sparsity"] == 0.8]
    accs = [100 * r["metrics"]["test_accuracy"] for r in rows]
    mean, std = sum(accs) / 2, abs(accs[0] - accs[1]) / 2 ** 0.5
    assert f"| mlp | GMP | " in table and f"{mean:.2f} ± {std:.2f} |" in table
    assert table.splitlines()[0] == "| model | method | test_accuracy @ 50% | test_accuracy @ 80% | time (s) |"
    csv = report_table(records, "test_loss", fmt="csv").splitlines()
    assert csv[0] == "model,method,sparsity,metric,mean,std,n,wall_s" and len(csv) == 1 + 1 + 2 * 2
    assert main(["report", str(reference), "--metric", "test_loss", "--format", "csv", "--out",
                 str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().splitlines() == csv
    assert main(["plot", str(reference), "--out", str(tmp_path / "p.png")]) == 0
    assert main(["plot", str(reference), "--log-density", "--metric", "test_loss", "--out",
                 str(tmp_path / "p.svg")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "p.png").stat().st_size > 20_000
    svg = (tmp_path / "p.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "density (%, log scale)" in svg and "GMP" in svg
    capsys.readouterr()
    assert main(["status", str(reference)]) == 0
    assert "10 trials: 10 done, 0 failed" in capsys.readouterr().out
    assert main(["plot", str(reference), "--out", str(tmp_path / "p.jpg")]) == 1


def test_directory_of_another_sweep_is_refused(tmp_path, reference, data):
    import shutil
    directory = tmp_path / "copy"
    shutil.copytree(reference, directory)
    other = h.tiny_sweep_text(data).replace("sparsity = [0.5, 0.8]", "sparsity = [0.5, 0.9]")
    with pytest.raises(SweepError, match="holds a different sweep .* 6 of them the same.*--force-new"):
        Sweep.from_text(other, directory=directory).run(progress=False)
    # --force-new: the directory runs the new file; unchanged finished trials are kept
    sweep = Sweep.from_text(other, directory=directory)
    sweep.run(workers=0, threads=1, progress=False, force_new=True)
    started = [e for e in h.events(directory) if e["event"] == "started"]
    assert len(started) == len([e for e in h.events(reference) if e["event"] == "started"]) + 4  # 0.9 x 2 x 2
    assert {r["sparsity"] for r in sweep.results()} == {0.0, 0.5, 0.9}


def test_torn_journal_line_is_skipped_and_index_rebuilt(tmp_path, reference, data):
    import shutil
    directory = tmp_path / "copy"
    shutil.copytree(reference, directory)
    journal = directory / "journal.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    last_finished = max(i for i, line in enumerate(lines) if '"event":"finished"' in line)
    trial = json.loads(lines[last_finished])["trial"]
    lines[last_finished] = lines[last_finished][:40]  # a torn write, then more events after it
    journal.write_text("".join(lines[:last_finished + 1]))  # ends without a newline
    (directory / "index.sqlite").write_bytes(b"garbage")  # the index is rebuilt from the journal
    with pytest.warns(RuntimeWarning, match="corrupt journal line"):
        h.run_here(h.tiny_sweep_text(data), directory)
    records = {r["id"]: r for r in SweepResults(directory).records()}
    assert all(r["state"] == "done" for r in records.values())
    assert [e["trial"] for e in h.events(directory, tolerant=True) if e["event"] == "finished"].count(trial) == 1
    assert records[trial]["metrics"] == {r["id"]: r for r in SweepResults(reference).records()}[trial]["metrics"]


def test_unwritable_directory_is_a_clear_error(tmp_path, data):
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot write to the sweep directory .*file/sweep"):
        Sweep.from_text(h.tiny_sweep_text(data), directory=tmp_path / "file" / "sweep").run(progress=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_journal_on_a_full_disk_is_a_clear_error(tmp_path):
    from sparse_engine.sweep.journal import Journal
    (tmp_path / "journal.jsonl").symlink_to("/dev/full")
    with pytest.raises(StoreError, match="cannot append to the journal .*: No space left on device "
                                         "\\(the disk is full\\)"):
        Journal(tmp_path / "journal.jsonl").append({"event": "x"})


def test_index_batch_is_all_or_nothing(tmp_path, reference):
    from sparse_engine.sweep.index import Index
    from sparse_engine.sweep.journal import Journal
    index = Index.build(Journal(reference / "journal.jsonl"), None)
    before = index.trials()
    trial = before[0]["id"]
    with pytest.raises(KeyError):  # the second event is malformed: the first is rolled back too
        index.apply([{"event": "failed", "trial": trial, "error": "x"}, {"event": "epoch", "trial": trial}], 10 ** 9)
    assert index.trials() == before and index.journal_offset() != 10 ** 9


def test_writes_that_hit_a_size_limit_fail_cleanly_and_resume(tmp_path, reference, data):
    """Every file write hits RLIMIT_FSIZE partway (checkpoints first): the run stops with a clear
    error, and once space is back, a rerun finishes with exactly the uninterrupted results."""
    sweep_file = tmp_path / "tiny.toml"
    sweep_file.write_text(h.tiny_sweep_text(data))
    directory = tmp_path / "run"
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000)); "
               "from sparse_engine.sweep.cli import main; "
               f"sys.exit(main(['run', {str(sweep_file)!r}, '--dir', {str(directory)!r}, '--workers', '0', "
               "'--threads', '1', '--quiet']))")
    run = subprocess.run([sys.executable, "-c", limited], cwd=h.REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: cannot write" in run.stderr and "(the file size limit is reached)" in run.stderr, run.stderr
    assert not list(directory.rglob("*.tmp*")), "a temporary file was left behind"
    import sqlite3
    assert sqlite3.connect(directory / "index.sqlite").execute("PRAGMA integrity_check").fetchone() == ("ok",)
    h.run_here(h.tiny_sweep_text(data), directory)
    h.assert_same_results(directory, reference)


def test_local_worker_that_dies_is_recorded_and_replaced(tmp_path, data):
    """A worker process that dies mid-trial: its trial is recorded as failed (crashed), a new
    worker takes the remaining trials."""
    methods = '[methods.dies]\nname = "sweep_helpers:die"\n[methods.one-shot]\nname = "one_shot"\n'
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]").replace(
        "sparsity = [0.5, 0.8]", "sparsity = [0.5]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    status = sweep.run(workers=1, threads=1, progress=False)
    assert (status["done"], status["failed"]) == (2, 1)
    dead = next(r for r in sweep.results() if r["method"] == "dies")
    assert dead["error"] == "worker process w0 died (exit code 3)"
    workers = {e["pid"] for e in h.events(tmp_path) if e["event"] == "started"}
    assert len(workers) == 2  # the replacement


def test_a_users_own_model_and_data_by_import_path(tmp_path):
    text = """
name = "user"
[data]
name = "sweep_helpers:blobs"
options = { features = 5, classes = 4 }
[pretrain]
epochs = 2
batch_size = 32
optimizer = { name = "sgd", lr = 0.1 }
[train]
epochs = 1
batch_size = 32
[models.mine]
name = "sweep_helpers:user_mlp"
options = { features = 5, hidden = 12, classes = 4 }
[methods.one-shot]
name = "one_shot"
[grid]
sparsity = [0.5, 0.75]
"""
    assert h.run_here(text, tmp_path / "sweep")["done"] == 3
    records = SweepResults(tmp_path / "sweep").records()
    n = 5 * 12 + 12 * 4
    for r in records:
        if r["kind"] == "prune":
            assert r["metrics"]["sparsity"] == round(r["sparsity"] * n) / n
    assert min(r["metrics"]["test_accuracy"] for r in records) > 0.5   # separable blobs, 4 classes
    bad = text.replace("hidden = 12", "hiden = 12")
    with pytest.raises(SweepFileError, match=r"<sweep>:\d+: models\.mine\.options\.hiden"):
        Sweep.from_text(bad, directory=tmp_path / "bad")
