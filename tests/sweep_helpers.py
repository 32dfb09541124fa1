"""Shared by tests/test_sweep*.py: a tiny sweep on small IDX files, user methods that fail or run
slowly (named in sweep files as ``sweep_helpers:...``), an uninterrupted baseline run, and the
kill -9 / resume driver."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparse_engine.pruning import GMP
from sparse_engine.sweep import Sweep
from sparse_engine.sweep.fields import Field, integer, real
from sparse_engine.sweep.methods import METHODS, Method
from sparse_engine.sweep.runner import build_trial
from sparse_engine.sweep.store import save_torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

TINY = """
name = "tiny"
device = "cpu"
metrics = ["accuracy", "loss"]
[data]
name = "fashion_mnist"
dir = "{data_dir}"
train_size = 384
[pretrain]
epochs = 2
batch_size = 64
optimizer = {{ name = "sgd", lr = 0.05 }}
[train]
epochs = 3
batch_size = 64
eval_every = 1
[models.mlp]
name = "second_order_mlp"
{methods}
[grid]
sparsity = [0.5, 0.8]
seed = [0, 1]
"""
TWO_METHODS = """
[methods.one-shot]
name = "one_shot"
[methods.GMP]
name = "gmp"
prunes = 4
"""
SLOW_METHOD = """
[methods.slow-GMP]
name = "sweep_helpers:slow_gmp"
delay = 0.03
"""


def tiny_sweep_text(data_dir: Path, methods: str = TWO_METHODS) -> str:
    return TINY.format(data_dir=data_dir, methods=methods)


def data_dir(tmp_path_factory) -> Path:
    """Small Fashion-MNIST-shaped IDX files, made once per session."""
    from test_data_and_demo import make_dataset
    root = tmp_path_factory.getbasetemp() / "sweep-data"
    if not (root / "t10k-labels-idx1-ubyte.gz").exists():
        make_dataset(root, n_train=512, n_test=128)
    return root


class SlowPruner:
    """A pruner that sleeps at every step (to give a kill time to land mid-trial)."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def step(self):
        time.sleep(self.delay)
        return self.inner.step()

    def on_epoch_end(self):
        return self.inner.on_epoch_end()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def slow_gmp(ctx, delay=0.03):
    """GMP with the registry's default options, sleeping ``delay`` s a step."""
    defaults = {k: f.default for k, f in METHODS["gmp"].options.items()}
    return SlowPruner(METHODS["gmp"].build(ctx, **defaults), delay)


def explode(ctx, when="build"):
    """A method that raises when built, or at the first step."""
    if when == "build":
        raise RuntimeError("boom at build")
    pruner = GMP(ctx.model, ctx.optimizer, ctx.sparsity, 0, 1, 1)

    class Exploding:
        def step(self):
            raise FloatingPointError("boom at step")

        on_epoch_end = pruner.on_epoch_end
        state_dict = pruner.state_dict
        load_state_dict = pruner.load_state_dict
    return Exploding()


def env_with_tests_path() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")])
    return env


def run_here(text: str, directory: Path, **options) -> dict:
    """Run a sweep in this process (``workers=0``), one thread."""
    return Sweep.from_text(text, directory=directory).run(workers=0, threads=1, progress=False, **options)


def baseline(tmp_path_factory, text: str, name: str) -> Path:
    """The directory of an uninterrupted run of ``text`` (in this process, one thread), made once
    per session and shared by the test modules."""
    directory = tmp_path_factory.getbasetemp() / f"sweep-baseline-{name}"
    if not (directory / "done").exists():
        run_here(text, directory)
        (directory / "done").write_text("")
    return directory


def events(directory: Path, tolerant: bool = False) -> list:
    out = []
    for line in (directory / "journal.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            if not tolerant and line.strip():
                raise
    return out


def start_run(sweep_file: Path, directory: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sparse_engine.sweep", "run", str(sweep_file), "--dir",
                             str(directory), "--quiet", *extra], cwd=REPO, env=env_with_tests_path(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, directory: Path, condition, timeout: float = 180) -> list:
    """``kill -9`` the runner as soon as ``condition(events)`` holds; returns the events then."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        journal = directory / "journal.jsonl"
        if journal.exists():
            seen = [json.loads(line) for line in journal.read_text().splitlines()
                    if line.strip() and line.endswith("}")]
            if condition(seen):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return seen
        if proc.poll() is not None:
            raise AssertionError(f"the runner ended before the kill point:\n{proc.stdout.read()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the kill point was not reached in time")


def mid_trial_ids(seen: list, kind: str) -> list:
    """Trials of ``kind`` with an epoch checkpoint that have not finished."""
    kinds = {e["trial"]: e["kind"] for e in seen if e["event"] == "declared"}
    finished = {e["trial"] for e in seen if e["event"] in ("finished", "failed")}
    return [e["trial"] for e in seen if e["event"] == "epoch" and kinds.get(e["trial"]) == kind
            and e["trial"] not in finished]


def mid_trial(kind: str):
    """Condition for :func:`kill_when`: a trial of ``kind`` is between two epochs."""
    return lambda seen: bool(mid_trial_ids(seen, kind))


def assert_processes_gone(pids, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    for pid in pids:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if time.time() > deadline:
                raise AssertionError(f"worker process {pid} outlived its killed runner")
            time.sleep(0.05)


def assert_same_results(directory: Path, reference: Path) -> None:
    """Every trial finished exactly once, with the reference run's metrics, per-epoch history
    and final weights (bit for bit)."""
    got = {r["id"]: r for r in Sweep_results(directory)}
    want = {r["id"]: r for r in Sweep_results(reference)}
    assert set(got) == set(want)
    finished = [e["trial"] for e in events(directory) if e["event"] == "finished"]
    assert sorted(finished) == sorted(set(finished)) == sorted(want), "a trial finished twice or never"
    for trial, r in want.items():
        assert got[trial]["state"] == "done", got[trial]["error"]
        assert got[trial]["metrics"] == r["metrics"], trial
        assert got[trial]["layers"] == r["layers"], trial
        assert got[trial]["history"] == r["history"], trial
        mine = torch.load(directory / "trials" / trial / "model.pt", weights_only=True)["model"]
        theirs = torch.load(reference / "trials" / trial / "model.pt", weights_only=True)["model"]
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), trial


def assert_resume_exact(spec, store, env, state_path: Path) -> tuple:
    """A trial rebuilt from its spec and given its epoch-1 state (saved at ``state_path``) ends exactly
    as the uninterrupted one: metrics, history, weights and masks. Returns the uninterrupted trial's
    result and final state."""
    straight = build_trial(spec, store, env)
    while not straight.finished:
        straight.train_epoch()
    resumed = build_trial(spec, store, env)
    resumed.train_epoch()
    save_torch(resumed.state_dict(), state_path)
    torch.manual_seed(1234)  # whatever happened to the RNGs in between
    resumed = build_trial(spec, store, env)
    resumed.load_state_dict(torch.load(state_path, weights_only=True))
    while not resumed.finished:
        resumed.train_epoch()
    a, b = straight.result(), resumed.result()
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"], spec.describe()
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), spec.describe()
    return a, straight.final_state()


def Sweep_results(directory: Path) -> list:
    from sparse_engine.sweep import SweepResults
    return SweepResults(directory).records(with_history=True)


def die(ctx):
    """A method whose worker process dies (as on a segfault or the OOM killer)."""
    os._exit(3)


def blobs(n_train=256, n_test=64, features=6, classes=3, seed=0):
    """A user data function: Gaussian blobs, ``(x_train, y_train, x_test, y_test)``."""
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, features, generator=g)
    y = torch.randint(0, classes, (n_train + n_test,), generator=g)
    x = centers[y] + torch.randn(n_train + n_test, features, generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def user_mlp(features=6, hidden=16, classes=3):
    """A user model builder."""
    return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, classes))


def _gmp_defaults() -> dict:
    return {k: f.default for k, f in METHODS["gmp"].options.items()}


# The same slow GMP, declared stackable: its trials train K at a time with `--stack K`.
stackable_slow_gmp = Method(lambda ctx, delay=0.03: slow_gmp(ctx, delay), {"delay": Field(real(0), 0.03)},
                            stackable=lambda config: True)


class NaNAt:
    """GMP whose model's weights turn NaN after optimizer step ``at`` (a diverging run)."""

    def __init__(self, ctx, at: int):
        self.inner, self.model, self.at, self.steps = METHODS["gmp"].build(ctx, **_gmp_defaults()), ctx.model, at, 0

    def step(self):
        self.steps += 1
        if self.steps == self.at:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return self.inner.step()

    def on_epoch_end(self):
        return self.inner.on_epoch_end()

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state["inner"])
        self.steps = state["steps"]


# GMP that diverges at step `at` (0: never), stackable.
nan_gmp = Method(lambda ctx, at=0: NaNAt(ctx, at), {"at": Field(integer(0), 0)}, stackable=lambda config: True)


class RowRNN(torch.nn.Module):
    """A user model over sequences: an image's 28 rows read by an LSTM, self-attention with a residual, the mean
    over time, a linear head. Written for ``(B, 1, 28, 28)`` images; its forward also runs on a stack's
    ``(K, B, 1, 28, 28)`` (time is dim -2, features -1)."""

    def __init__(self, hidden: int = 12):
        super().__init__()
        self.lstm = torch.nn.LSTM(28, hidden, batch_first=True)
        self.attn = torch.nn.MultiheadAttention(hidden, 2, batch_first=True)
        self.head = torch.nn.Linear(hidden, 10)

    def forward(self, x):
        h, _ = self.lstm(x.squeeze(-3))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(dim=-2))


def row_rnn(hidden: int = 12) -> torch.nn.Module:
    return RowRNN(hidden)
