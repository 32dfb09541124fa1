"""Sweeps with model stacking (``--stack K``): trials packed into stacked models give the results they give
alone, are recorded and checkpointed as their own, resume exactly after kill -9, and fail alone."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sweep_helpers as h
from sparse_engine.sweep import Sweep, SweepResults, pack_units
from sparse_engine.sweep.runner import WorkerEnv, build_trial
from sparse_engine.sweep.store import Store, load_torch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return h.data_dir(tmp_path_factory)


def run_stacked(text: str, directory: Path, stack: int) -> dict:
    return Sweep.from_text(text, directory=directory).run(workers=0, threads=1, progress=False, stack=stack)


def records(directory: Path) -> dict:
    return {r["id"]: r for r in SweepResults(directory).records(with_history=True)}


def final_weights(directory: Path, trial: str) -> dict:
    return load_torch(directory / "trials" / trial / "model.pt")["model"]


def assert_close_results(got: dict, want: dict, directory: Path, reference: Path) -> None:
    """The same trials done, with the same masks and sparsities and, up to float rounding (the stacked
    kernels sum in another order), the same losses, accuracies and weights."""
    assert set(got) == set(want)
    for i, r in want.items():
        g = got[i]
        assert g["state"] == "done", g["error"]
        assert g["layers"] == r["layers"], i
        assert g["metrics"]["sparsity"] == r["metrics"]["sparsity"], i
        for key in ("train_loss", "test_loss"):
            assert g["metrics"][key] == pytest.approx(r["metrics"][key], rel=1e-4, abs=1e-5), (i, key)
        assert abs(g["metrics"]["test_accuracy"] - r["metrics"]["test_accuracy"]) <= 1 / 128, i
        assert [e["lr"] for e in g["history"]] == pytest.approx([e["lr"] for e in r["history"]], rel=1e-12), i
        mine, theirs = final_weights(directory, i), final_weights(reference, i)
        assert mine.keys() == theirs.keys(), i
        for k in mine:
            if mine[k].is_floating_point():
                torch.testing.assert_close(mine[k], theirs[k], rtol=1e-3, atol=1e-4, msg=f"{i} {k}")
            else:  # masks, counters
                assert torch.equal(mine[k], theirs[k]), (i, k)


def build_stack(specs, store, env):
    """The stack ``run_stacked`` trains for ``specs`` (fresh trials)."""
    from sparse_engine.sweep.runner import TrialRecorder
    from sparse_engine.sweep.stacked import _Member, _Stack
    return _Stack([_Member(spec, TrialRecorder(store, spec, env), None).build(store, env) for spec in specs])


def test_copy_out_gives_each_trial_its_exact_masks(tmp_path, data):
    """The masks copied out of a stack are the stack's, bit for bit, also where a kept weight is exactly 0
    (masks travel in the state dict's metadata, not as a tensor key)."""
    text = h.tiny_sweep_text(data).replace("seed = [0, 1]", "seed = [0]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    sweep.run(workers=0, threads=1, progress=False)
    store, env = Store(tmp_path), WorkerEnv(str(tmp_path))
    stack_ = build_stack([t for t in sweep.trials if t.kind == "prune"], store, env)
    name, layer = next((n, m) for n, m in stack_.model.module.named_modules() if hasattr(m, "mask_bits"))
    with torch.no_grad():
        mask = torch.rand(layer.weight.shape) < 0.5
        layer.set_mask(mask)
        kept = mask[1].nonzero()[0]
        layer.weight[(1, *kept)] = 0.0  # a kept weight that is exactly zero
    stack_.copy_out(1)
    single = stack_.members[1].trial.model.get_submodule(name)
    assert torch.equal(single.mask, mask[1]) and torch.equal(single.weight, layer.weight[1])


def test_stacked_sweep_gives_the_results_of_trials_run_alone(tmp_path, tmp_path_factory, data):
    text = h.tiny_sweep_text(data)  # one-shot and GMP, 2 sparsities, 2 seeds: 8 pruning trials of one group
    reference = h.baseline(tmp_path_factory, text, "two-methods")
    status = run_stacked(text, tmp_path, stack=3)
    assert (status["done"], status["failed"]) == (10, 0)
    assert_close_results(records(tmp_path), records(reference), tmp_path, reference)
    started = [e for e in h.events(tmp_path) if e["event"] == "started"]
    # the 2 dense parents (seeds 0 and 1) in one stack; 8 pruning trials in stacks of 3, 3 and 2
    assert sorted(e.get("stacked", 1) for e in started) == [2, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    run = [e for e in h.events(tmp_path) if e["event"] == "run"][-1]
    assert run["settings"]["stack"] == 3
    for r in records(tmp_path).values():  # every trial recorded as its own
        assert len(r["history"]) == r["config"]["pretrain" if r["kind"] == "pretrain" else "train"]["epochs"]
        assert r["wall_s"] > 0


def test_stacked_sweep_of_a_recurrent_attention_model(tmp_path, tmp_path_factory, data):
    """A user model with an LSTM and self-attention (masked weights per Parameter, a stacked out_proj inside the
    stacked attention) stacks in a sweep with the results of its trials alone."""
    text = h.tiny_sweep_text(data).replace('name = "second_order_mlp"', 'name = "sweep_helpers:row_rnn"')
    reference = h.baseline(tmp_path_factory, text, "row-rnn")
    status = run_stacked(text, tmp_path, stack=4)
    assert (status["done"], status["failed"]) == (10, 0)
    assert sorted(e.get("stacked", 1) for e in h.events(tmp_path) if e["event"] == "started") == [2, 2] + [4] * 8
    assert_close_results(records(tmp_path), records(reference), tmp_path, reference)
    pruned = [r for r in records(tmp_path).values() if r["kind"] == "prune"]
    assert {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "attn.in_proj_weight", "attn.out_proj"} <= set(pruned[0]["layers"])


def test_dispatch_choices_are_shared_through_the_sweep_directory(tmp_path, data):
    """The masked ops' measured choices (ops.dispatch) are written to DIR/dispatch.json before the checkpoints
    that computed with them, and a worker (a resumed run) takes them from there, keeping those it has made."""
    from sparse_engine.ops import dispatch
    from sparse_engine.sweep.runner import load_dispatch_choices
    text = h.tiny_sweep_text(data).replace('name = "second_order_mlp"', 'name = "sweep_helpers:row_rnn"')
    text = text.replace("seed = [0, 1]", "seed = [0]")
    previous = dispatch.pinned()
    dispatch.pin(None)
    try:
        dispatch.clear()
        run_stacked(text, tmp_path, stack=4)
        mine = dispatch.choices()
        assert any(k.startswith("stacked_rnn|") for k in mine) and any(k.startswith("masked_linear|") for k in mine)
        shared = json.loads((tmp_path / "dispatch.json").read_text())["choices"]
        assert shared == mine
        dispatch.clear()
        load_dispatch_choices(Store(tmp_path))
        assert dispatch.choices() == shared
        key = next(iter(shared))
        other = "fused" if shared[key] == "materialized" else "materialized"
        dispatch.clear()
        dispatch._cache[key] = other  # a choice this process has made already
        load_dispatch_choices(Store(tmp_path))
        assert dispatch.choices()[key] == other
    finally:
        dispatch.clear()
        dispatch.pin(previous)


def test_a_stacked_trials_checkpoint_resumes_alone(tmp_path, data):
    """A checkpoint written from a stack is an ordinary trial checkpoint: the trial resumed from it alone
    ends as the stacked run does (up to float rounding)."""
    text = h.tiny_sweep_text(data).replace("seed = [0, 1]", "seed = [0]")
    stacked_dir = tmp_path / "stacked"
    sweep = Sweep.from_text(text, directory=stacked_dir)
    sweep.run(workers=0, threads=1, progress=False, stack=4, checkpoint_every=1)
    # the final checkpoints are removed when trials finish: run the stacked trials again, to epoch 1 only
    prune = [t for t in sweep.trials if t.kind == "prune"]
    store, env = Store(stacked_dir), WorkerEnv(str(stacked_dir))
    s = build_stack(prune, store, env)
    members = s.members
    losses, seconds = s.train_epoch()
    s.copy_out(2)
    trial = members[2].trial
    trial.end_epoch(losses[2], seconds)
    state = trial.state_dict()
    alone = build_trial(prune[2], store, env)
    alone.load_state_dict(state)
    while not alone.finished:
        alone.train_epoch()
    want = records(stacked_dir)[prune[2].id]
    got = alone.result()
    assert got["layers"] == want["layers"]
    assert got["metrics"]["train_loss"] == pytest.approx(want["metrics"]["train_loss"], rel=1e-4)
    assert abs(got["metrics"]["test_accuracy"] - want["metrics"]["test_accuracy"]) <= 1 / 128


def test_kill_9_of_a_stacked_sweep_and_resume_give_the_uninterrupted_results(tmp_path, tmp_path_factory, data):
    methods = '[methods.slow-GMP]\nname = "sweep_helpers:stackable_slow_gmp"\n'
    text = h.tiny_sweep_text(data, methods)
    reference = tmp_path_factory.getbasetemp() / "sweep-stacked-slow"
    if not (reference / "done").exists():
        run_stacked(text, reference, stack=4)
        (reference / "done").write_text("")
    sweep_file = tmp_path / "tiny.toml"
    sweep_file.write_text(text)
    directory = tmp_path / "run"
    seen = h.kill_when(h.start_run(sweep_file, directory, "--threads", "1", "--stack", "4"), directory,
                       h.mid_trial("prune"))
    h.assert_processes_gone({e["pid"] for e in seen if e["event"] == "started"})
    killed = h.mid_trial_ids(seen, "prune")
    done = subprocess.run([sys.executable, "-m", "sparse_engine.sweep", "run", str(sweep_file), "--dir",
                           str(directory), "--threads", "1", "--quiet", "--stack", "4"], cwd=h.REPO,
                          env=h.env_with_tests_path(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = [e for e in h.events(directory) if e["event"] == "started" and e["trial"] in killed]
    assert resumed and all(e["stacked"] == 4 for e in resumed)
    assert max(e["from_epoch"] for e in resumed) >= 1  # continued from checkpoints, not from scratch
    h.assert_same_results(directory, reference)


def test_a_diverging_model_fails_alone(tmp_path, tmp_path_factory, data):
    """One model of a stack turns NaN mid-epoch: its trial is recorded failed (a non-finite training loss),
    the other models of its stack finish with the results they have without it."""
    methods = ('[methods.ok]\nname = "sweep_helpers:nan_gmp"\n'
               '[methods.diverges]\nname = "sweep_helpers:nan_gmp"\nat = 2\n')
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]")
    status = run_stacked(text, tmp_path, stack=4)
    assert (status["done"], status["failed"]) == (3, 2)
    got = records(tmp_path)
    failed = [r for r in got.values() if r["state"] == "failed"]
    assert {r["method"] for r in failed} == {"diverges"}
    for r in failed:  # its pruner meets the NaN weights first
        assert r["error"] == "ValueError: scores of layer '1' contain NaN; NaN scores cannot be ranked", r["error"]
    alone_text = h.tiny_sweep_text(data, '[methods.ok]\nname = "sweep_helpers:nan_gmp"\n').replace(
        "seed = [0, 1]", "seed = [0]")
    alone = tmp_path / "alone"
    h.run_here(alone_text, alone)
    want = records(alone)
    assert_close_results({i: got[i] for i in want}, want, tmp_path, alone)
    # the same divergence alone fails the same way
    solo = tmp_path / "solo"
    assert h.run_here(text, solo)["failed"] == 2
    assert sorted(r["error"] for r in records(solo).values() if r["state"] == "failed") == [failed[0]["error"]] * 2


def test_a_nan_loss_fails_the_trial(tmp_path, data):
    """A model that diverges without a pruner to notice (GMP has stopped pruning) fails by its loss, alone
    and in a stack."""
    methods = ('[methods.ok]\nname = "sweep_helpers:nan_gmp"\n'
               '[methods.diverges]\nname = "sweep_helpers:nan_gmp"\nat = 17\n')  # epoch 3 of 3, after GMP
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]")
    for stack in (1, 4):
        status = run_stacked(text, tmp_path / str(stack), stack=stack)
        assert (status["done"], status["failed"]) == (3, 2)
        for r in records(tmp_path / str(stack)).values():
            if r["state"] == "failed":
                assert r["error"].startswith("FloatingPointError: the training loss is nan in epoch 3"), r["error"]


def test_units_pack_only_trials_that_can_share_a_stack(data):
    methods = h.TWO_METHODS + ('[methods.random]\nname = "one_shot"\nscore = "random"\n'
                               '[methods.set]\nname = "set"\n[methods.ticket]\nname = "lottery"\n'
                               '[methods.slow]\nname = "sweep_helpers:slow_gmp"\n')
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]")
    text = text.replace('[grid]', '[grid]\n"train.optimizer" = [{ name = "sgd", lr = 0.1 }, '
                                  '{ name = "sgd", lr = 0.01 }, { name = "adamw" }]')
    prune = [t for t in Sweep.from_text(text).trials if t.kind == "prune"]
    units = pack_units(prune, free_slots=100, stack=100)
    for unit in units:
        if len(unit) > 1:
            assert len({t.config["train"]["optimizer"]["name"] for t in unit}) == 1
            assert "sweep_helpers:slow_gmp" not in {t.config["method"]["name"] for t in unit}  # not declared stackable
    sizes = sorted(len(u) for u in units)
    # sgd (2 learning rates) x {one-shot, GMP, random, lottery, SET} x 2 sparsities = 20 in one stack (pruning at
    # initialisation or from a parent: the same architecture); adamw: the same 5 methods x 2 = 10;
    # alone: the slow user method (6)
    assert sizes == [1] * 6 + [10, 20]


def test_random_methods_in_a_stack_draw_what_they_draw_alone(tmp_path, data):
    """One-shot with random scores, SET (random growth, pruning at initialisation) and PAI's sanity checks
    (shuffled masks, reinitialised weights): stacked trials draw from their own streams, so they end as
    alone (up to float rounding), masks included."""
    methods = ('[methods.random]\nname = "one_shot"\nscore = "random"\n'
               '[methods.set]\nname = "set"\ndelta_t = 2\n'
               '[methods.pai]\nname = "pai"\nshuffle = true\nreinit = true\n')
    text = h.tiny_sweep_text(data, methods)
    h.run_here(text, tmp_path / "alone")
    status = run_stacked(text, tmp_path / "stacked", stack=16)
    assert status["failed"] == 0
    started = [e for e in h.events(tmp_path / "stacked") if e["event"] == "started" and "stacked" in e]
    # the 2 parents in one stack; the 12 pruning trials, from a parent or at initialisation, in another
    assert sorted(e["stacked"] for e in started) == [2, 2] + [12] * 12
    assert_close_results(records(tmp_path / "stacked"), records(tmp_path / "alone"), tmp_path / "stacked",
                         tmp_path / "alone")


def test_stack_argument_is_checked(tmp_path, data):
    sweep = Sweep.from_text(h.tiny_sweep_text(data), directory=tmp_path)
    for bad in (0, -2, 1.5, True, "all"):
        with pytest.raises(ValueError, match="stack: expected an integer >= 1"):
            sweep.run(workers=0, stack=bad, progress=False)


def test_auto_stacks_only_where_the_probe_measures_it_faster(tmp_path, tmp_path_factory, data, monkeypatch):
    """stack="auto": every ready trial of a group goes to one probe (a measured step alone vs stacked, memory
    cap); the decision is recorded in each trial's started event. Forced both ways here (FASTER), since
    which is faster depends on the machine."""
    from sparse_engine.sweep import stacked
    text = h.tiny_sweep_text(data)
    reference = h.baseline(tmp_path_factory, text, "two-methods")
    monkeypatch.setattr(stacked, "FASTER", 0.0)  # stacking never pays: one at a time, exactly as alone
    monkeypatch.setattr(stacked, "_decisions", {})
    assert run_stacked(text, tmp_path / "never", stack="auto")["done"] == 10
    h.assert_same_results(tmp_path / "never", reference)
    started = [e for e in h.events(tmp_path / "never") if e["event"] == "started" and "stack_probe" in e]
    assert len(started) == 10 and all(e["stack_probe"]["k"] == 1 and "stacked" not in e for e in started)
    probed = sorted(e["stack_probe"]["probed"] for e in started)  # the 2 parents, then the 8 pruning trials
    assert probed == [2, 2] + [8] * 8
    probe = started[-1]["stack_probe"]
    assert probe["memory_cap"] >= 8 and probe["alone_ms"] > 0 and probe["stacked_ms"] > 0
    monkeypatch.setattr(stacked, "FASTER", float("inf"))  # always: all 8 in one stack
    monkeypatch.setattr(stacked, "_decisions", {})
    assert run_stacked(text, tmp_path / "always", stack="auto")["done"] == 10
    assert_close_results(records(tmp_path / "always"), records(reference), tmp_path / "always", reference)
    started = [e for e in h.events(tmp_path / "always") if e["event"] == "started" and "stack_probe" in e]
    assert sorted(e["stacked"] for e in started) == [2, 2] + [8] * 8
    assert all(e["stack_probe"]["k"] == e["stacked"] for e in started)


def test_auto_caps_the_stack_by_memory(tmp_path, data, monkeypatch):
    from sparse_engine.sweep import stacked
    monkeypatch.setattr(stacked, "FASTER", float("inf"))
    monkeypatch.setattr(stacked, "_decisions", {})
    monkeypatch.setattr(stacked, "_free_bytes", lambda device: 3 * stacked.MEMORY_SHARE ** -1 * 10 ** 9)
    monkeypatch.setattr(stacked, "_model_bytes", lambda trial, xb: 10 ** 9)  # 3 models fit
    assert run_stacked(h.tiny_sweep_text(data), tmp_path, stack="auto")["done"] == 10
    sizes = sorted(e["stacked"] for e in h.events(tmp_path) if e["event"] == "started" and "stacked" in e)
    assert sizes == [2, 2] + [2, 2, 3, 3, 3, 3, 3, 3]  # the parents, then the pruning trials


@pytest.mark.gpu
def test_stacked_sweep_on_cuda_matches_trials_alone(tmp_path, data):
    """On a GPU: the stacked kernels (Triton, one launch over the models), the memory probe of stack="auto"
    and the per-model streams, against the same trials run alone on CUDA."""
    text = h.tiny_sweep_text(data).replace('device = "cpu"', 'device = "cuda"')
    h.run_here(text, tmp_path / "alone")
    assert run_stacked(text, tmp_path / "stacked", stack=4)["failed"] == 0
    assert_close_results(records(tmp_path / "stacked"), records(tmp_path / "alone"), tmp_path / "stacked",
                         tmp_path / "alone")
    assert run_stacked(text, tmp_path / "auto", stack="auto")["failed"] == 0
    probes = [e["stack_probe"] for e in h.events(tmp_path / "auto") if e["event"] == "started" and "stack_probe" in e]
    assert probes and probes[0]["memory_cap"] >= 1 and probes[0]["alone_ms"] > 0


def test_a_probe_that_fails_runs_the_trials_one_at_a_time(tmp_path, tmp_path_factory, data, monkeypatch):
    from sparse_engine.sweep import stacked

    def out_of_memory(*args):
        raise RuntimeError("out of memory (a test)")
    monkeypatch.setattr(stacked, "probe", out_of_memory)
    monkeypatch.setattr(stacked, "_decisions", {})
    text = h.tiny_sweep_text(data)
    assert run_stacked(text, tmp_path, stack="auto")["done"] == 10
    h.assert_same_results(tmp_path, h.baseline(tmp_path_factory, text, "two-methods"))
    started = [e for e in h.events(tmp_path) if e["event"] == "started" and "stack_probe" in e]
    assert len(started) == 10 and all("stacked" not in e for e in started)
    assert started[0]["stack_probe"] == {"k": 1, "probe_error": "RuntimeError: out of memory (a test)"}


def test_stacked_parents_keep_the_snapshots_their_tickets_rewind_to(tmp_path, data):
    """Dense parents stack too (seeds 0 and 1); a lottery ticket rewinding to step 2 gets the snapshot its
    parent kept after step 2 in the stack, as alone."""
    methods = '[methods.ticket]\nname = "lottery"\nrewind_step = 2\n[methods.one-shot]\nname = "one_shot"\n'
    text = h.tiny_sweep_text(data, methods)
    h.run_here(text, tmp_path / "alone")
    assert run_stacked(text, tmp_path / "stacked", stack=8)["failed"] == 0
    got, want = records(tmp_path / "stacked"), records(tmp_path / "alone")
    assert_close_results(got, want, tmp_path / "stacked", tmp_path / "alone")
    for trial, r in want.items():
        if r["kind"] == "pretrain":
            mine = load_torch(tmp_path / "stacked" / "trials" / trial / "model.pt")
            theirs = load_torch(tmp_path / "alone" / "trials" / trial / "model.pt")
            assert mine["snapshots"].keys() == theirs["snapshots"].keys() == {2}
            for k, v in theirs["snapshots"][2].items():
                torch.testing.assert_close(mine["snapshots"][2][k], v, rtol=1e-4, atol=1e-5)
            for k, v in theirs["init"].items():
                assert torch.equal(mine["init"][k], v), k


def test_lottery_tickets_with_adamw_stack_as_alone(tmp_path, data):
    """With AdamW, a ticket's rewinding at each phase clears its own model's moments and step count in the
    stack (the other models keep theirs): the trials end as alone."""
    methods = '[methods.ticket]\nname = "lottery"\nphases = 3\n[methods.one-shot]\nname = "one_shot"\n'
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]")
    text = text.replace("[train]\n", '[train]\noptimizer = { name = "adamw", lr = 0.002 }\n')
    h.run_here(text, tmp_path / "alone")
    assert run_stacked(text, tmp_path / "stacked", stack=8)["failed"] == 0
    got, want = records(tmp_path / "stacked"), records(tmp_path / "alone")
    assert_close_results(got, want, tmp_path / "stacked", tmp_path / "alone")
    started = [e for e in h.events(tmp_path / "stacked") if e["event"] == "started" and "stacked" in e]
    assert sorted(e["stacked"] for e in started) == [4] * 4  # one-shot and the tickets, 2 sparsities each
