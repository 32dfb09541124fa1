"""The sweep methods of the other paradigms (issue 12): pruning at initialisation (``pai``), lottery
tickets (``lottery``), dynamic sparse training (``set``, ``rigl``): each runs in a tiny sweep and
ends at its exact target sparsity, resumes exactly, and bad options are errors naming the key."""
import dataclasses
from pathlib import Path

import pytest
import torch

import sweep_helpers as h
from sparse_engine.nn import sparse_modules
from sparse_engine.pruning.select.allocation import target_kept
from sparse_engine.sweep import Sweep, SweepFileError, SweepResults
from sparse_engine.sweep.plan import trial_id
from sparse_engine.sweep.runner import WorkerEnv, build_trial
from sparse_engine.sweep.store import Store, save_torch
from sparse_engine.sweep.trial import saved_model

PARADIGMS = """
[methods.random]
name = "pai"
score = "random"
[methods.SNIP]
name = "pai"
score = "snip"
[methods.GraSP]
name = "pai"
score = "grasp"
allocation = "erk"
[methods.SynFlow]
name = "pai"
score = "synflow"
iterations = 10
[methods.SNIP-shuffled]
name = "pai"
score = "snip"
shuffle = true
reinit = true
[methods.ticket]
name = "lottery"
[methods.ticket-reinit]
name = "lottery"
reinit = true
[methods.ticket-2]
name = "lottery"
phases = 2
allocation = "uniform"
[methods.SET]
name = "set"
delta_t = 2
[methods.RigL]
name = "rigl"
delta_t = 2
decay = "linear"
"""
FROM_INIT = ("random", "SNIP", "GraSP", "SynFlow", "SNIP-shuffled", "SET", "RigL")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return h.data_dir(tmp_path_factory)


def paradigms_text(data: Path, methods: str = PARADIGMS) -> str:
    text = h.tiny_sweep_text(data, methods).replace("seed = [0, 1]", "seed = [0]")
    return text.replace("train_size = 384", "train_size = 256")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data) -> Path:
    return h.baseline(tmp_path_factory, paradigms_text(data), "paradigms")


def masks(directory: Path, record: dict, config: dict) -> dict:
    state = torch.load(directory / "trials" / record["id"] / "model.pt", weights_only=True)
    model = saved_model(config["model"], state["model"], True, "cpu")
    return {name: m.mask.clone() for name, m in sparse_modules(model)}


def test_every_method_runs_and_ends_at_its_exact_target(swept):
    sweep = Sweep.from_text(paradigms_text(Path("/unused")))
    specs = {(t.labels["method"], t.labels["sparsity"]): t for t in sweep.trials if t.kind == "prune"}
    records = [r for r in SweepResults(swept).records(with_history=True) if r["method"] != "dense"]
    assert {r["method"] for r in records} == {t.labels["method"] for t in specs.values()}
    assert all(r["state"] == "done" for r in records), [r["error"] for r in records if r["state"] != "done"]
    for r in records:
        spec = specs[(r["method"], r["sparsity"])]
        layers = masks(swept, r, spec.config)
        n = sum(m.numel() for m in layers.values())
        kept = sum(int(m.sum()) for m in layers.values())
        assert kept == target_kept(n, r["sparsity"]), (r["method"], r["sparsity"], kept)
        assert all(int(m.sum()) > 0 for m in layers.values()), r["method"]  # no layer collapse here
        if r["method"] in FROM_INIT:
            # pruned at initialisation, without a parent, and the sparsity held exactly at every epoch
            assert spec.parent is None and spec.config["pretrain"] is None, r["method"]
            assert {e["sparsity"] for e in r["history"]} == {r["metrics"]["sparsity"]}, r["method"]
        else:
            assert spec.parent is not None, r["method"]
        assert all(e["train_loss"] < 10 for e in r["history"]), r["method"]  # finite, no divergence


def test_ticket_and_its_reinit_control_share_the_mask_not_the_weights(swept):
    records = {(r["method"], r["sparsity"]): r for r in SweepResults(swept).records()}
    config = Sweep.from_text(paradigms_text(Path("/unused"))).trials[-1].config
    for s in (0.5, 0.8):
        ticket = masks(swept, records[("ticket", s)], config)
        control = masks(swept, records[("ticket-reinit", s)], config)
        assert all(torch.equal(ticket[k], control[k]) for k in ticket)
        assert records[("ticket", s)]["metrics"] != records[("ticket-reinit", s)]["metrics"]


def _store_with_parents(sweep: Sweep, directory: Path):
    store, env = Store(directory), WorkerEnv(str(directory))
    store.create()
    for spec in sweep.trials:
        if spec.kind == "pretrain":
            trial = build_trial(spec, store, env)
            while not trial.finished:
                trial.train_epoch()
            save_torch(trial.final_state(), store.model(spec.id))
    return store, env


def test_ticket_starts_from_the_parents_initialisation_masked(tmp_path, data):
    text = paradigms_text(data).replace("sparsity = [0.5, 0.8]", "sparsity = [0.8]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    torch.set_num_threads(1)
    store, env = _store_with_parents(sweep, tmp_path)
    spec = next(t for t in sweep.trials if t.labels.get("method") == "ticket")
    init = torch.load(store.model(spec.parent), weights_only=True)["init"]
    trial = build_trial(spec, store, env)
    state = trial.model.state_dict()
    masked = {f"{name}.weight": m.mask for name, m in sparse_modules(trial.model)}
    assert masked and set(init) <= set(state)
    for key, value in init.items():  # rewound exactly, pruned weights zero
        assert torch.equal(state[key], value * masked[key] if key in masked else value), key


def test_resume_mid_run_is_exact(tmp_path, data):
    """A trial rebuilt from its spec and given its epoch-1 state ends exactly as the uninterrupted
    one (weights, masks, metrics): the PaI, lottery and DST generators and states are checkpointed."""
    chosen = ("SynFlow]", "SNIP-shuffled]", "ticket-reinit]", "SET]", "RigL]")
    methods = "".join("[methods." + b for b in PARADIGMS.split("[methods.") if b.startswith(chosen))
    text = paradigms_text(data, methods)
    text = text.replace("sparsity = [0.5, 0.8]", "sparsity = [0.8]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    torch.set_num_threads(1)
    store, env = _store_with_parents(sweep, tmp_path)
    for spec in (t for t in sweep.trials if t.kind == "prune"):
        h.assert_resume_exact(spec, store, env, tmp_path / "state.pt")


def one_method(method: str) -> str:
    return h.tiny_sweep_text(Path("/unused"), "[methods.M]\n" + method + "\n")


@pytest.mark.parametrize("method,expected", [
    ('name = "pai"\nscore = "snipp"', "methods.M.score: expected one of 'snip', 'grasp', 'synflow'"),
    ('name = "pai"\nallocation = "erdos"', "methods.M.allocation: expected one of"),
    ('name = "pai"\niterations = 0', "methods.M.iterations: expected an integer >= 1"),
    ('name = "pai"\nshuffle = "yes"', "methods.M.shuffle: expected true or false"),
    ('name = "pai"\nreinit = 1', "methods.M.reinit: expected true or false"),
    ('name = "pai"\nphases = 2', "methods.M.phases: unknown key"),
    ('name = "pai"\nlr_schedule = "slr"', "lr_schedule 'slr' replays the parent's schedule"),
    ('name = "lottery"\nphases = 0', "methods.M.phases: expected an integer >= 1"),
    ('name = "lottery"\nreinit = "no"', "methods.M.reinit: expected true or false"),
    ('name = "lottery"\nrewind_step = -1', "methods.M.rewind_step: expected an integer >= 0"),
    ('name = "lottery"\nrewind_step = 2.5', "methods.M.rewind_step: expected an integer"),
    ('name = "lottery"\nrewind_step = 12', "methods.M.rewind_step: expected a step below the dense parent's 12 "),
    ('name = "gmp"\nrewind_step = 3', "methods.M.rewind_step: unknown key"),
    ('name = "lottery"\nlr_schedule = "constant"', "methods.M.lr_schedule: expected one of"),
    ('name = "set"\ndelta_t = 0', "methods.M.delta_t: expected an integer >= 1"),
    ('name = "set"\ndrop_fraction = 1.5', "methods.M.drop_fraction: expected a number in [0, 1]"),
    ('name = "rigl"\ndecay = "cubic"', "methods.M.decay: expected one of 'cosine', 'linear', 'constant'"),
    ('name = "rigl"\nstop = 0', "methods.M.stop: expected a number in (0, 1]"),
    ('name = "rigl"\nallocation = "global"\nscore = "magnitude"', "methods.M.score: unknown key"),
])
def test_bad_options_are_errors_that_name_the_key(method, expected):
    with pytest.raises(SweepFileError) as e:
        Sweep.from_text(one_method(method), name="sweep.toml")
    assert any(expected in p for p in e.value.problems), e.value.problems


def test_methods_from_init_need_no_pretraining():
    no_parent = ("[pretrain]\nepochs = 2\n", "[pretrain]\n")
    trials = Sweep.from_text(one_method('name = "rigl"').replace(*no_parent)).trials
    assert len(trials) == 4 and all(t.kind == "prune" and t.parent is None for t in trials)
    with pytest.raises(SweepFileError, match="pretrain.epochs: missing"):
        Sweep.from_text(one_method('name = "lottery"').replace(*no_parent))


def test_reproduction_sweep_file_is_valid():
    sweep = Sweep.from_file(h.REPO / "examples" / "reproduction.toml")
    prune = [t for t in sweep.trials if t.kind == "prune"]
    assert len(prune) == 16 * 3 * 3  # 16 sparse methods (dense is the parent) x 3 sparsities x 3 seeds
    assert {t.labels["sparsity"] for t in prune} == {0.9, 0.95, 0.98} and {t.labels["seed"] for t in prune} == {0, 1, 2}
    assert "beyond_accuracy" in sweep.trials[0].config["metrics"]
    # the same budget in optimizer steps: parent + retraining for the methods that start from the parent,
    # all of it from initialisation for the others
    for t in prune:
        steps = t.config["train"]["epochs"]
        if t.parent is not None:
            steps += t.config["pretrain"]["epochs"]
        assert steps == 14, t.describe()


# -- lottery tickets rewound to an early step k of the parent (open_lth's rewinding_steps) ----------

REWIND = """
[methods.ticket-k]
name = "lottery"
rewind_step = 5
[methods.ticket-k-2]
name = "lottery"
rewind_step = 3
phases = 2
[methods.GMP]
name = "gmp"
"""


def _parent_reference(spec, store, env, steps) -> tuple:
    """The parent trained by ``train_epoch`` directly from a parent spec without snapshots:
    ``({step: state_dict after it}, final state_dict)`` -- not the trial's snapshot code path."""
    from sparse_engine.pruning.methods.lottery import snapshot
    from sparse_engine.train import train_epoch
    plain = {k: v for k, v in spec.config.items() if k != "snapshot_steps"}
    trial = build_trial(dataclasses.replace(spec, config=plain), store, env)
    assert not trial.snapshot_steps
    seen, count = {}, [0]

    def capture():
        count[0] += 1
        if count[0] in steps:
            seen[count[0]] = {k: v.clone() for k, v in trial.model.state_dict().items()}
    for _ in range(trial.epochs):
        train_epoch(trial.model, trial.optimizer, trial.x_train, trial.y_train, trial.batch_size, trial.device,
                    scheduler=trial.scheduler, generator=trial.generator, on_step=capture)
    return seen, trial.model.state_dict()


def test_ticket_rewinds_to_the_parents_weights_at_step_k_masked(tmp_path, data):
    text = paradigms_text(data, REWIND).replace("sparsity = [0.5, 0.8]", "sparsity = [0.8]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    parent = next(t for t in sweep.trials if t.kind == "pretrain")
    assert parent.config["snapshot_steps"] == [3, 5]  # what its tickets ask for; GMP's asks for nothing
    torch.set_num_threads(1)
    store, env = _store_with_parents(sweep, tmp_path)
    saved = torch.load(store.model(parent.id), weights_only=True)
    assert sorted(saved["snapshots"]) == [3, 5]
    reference, final = _parent_reference(parent, store, env, {3, 5})
    assert all(torch.equal(saved["model"][k], v) for k, v in final.items())  # snapshots change no training
    for label, step in (("ticket-k", 5), ("ticket-k-2", 3)):
        spec = next(t for t in sweep.trials if t.labels.get("method") == label)
        assert spec.parent == parent.id
        model = build_trial(spec, store, env).model
        state = model.state_dict()
        masked = {f"{name}.weight": m.mask for name, m in sparse_modules(model)}
        assert masked
        for key, value in reference[step].items():  # rewound exactly to step k, pruned weights zero
            assert torch.equal(saved["snapshots"][step][key], value), key
            assert torch.equal(state[key], value * masked[key] if key in masked else value), (label, key)
        assert any(not torch.equal(saved["init"][k], v) for k, v in reference[step].items())  # not the init


def test_parent_resumed_mid_training_keeps_its_snapshots(tmp_path, data):
    """Killed after epoch 1 (steps 1-4): the snapshot of step 3 comes from the checkpoint, step 5's is
    taken after the resume; both equal the uninterrupted parent's."""
    sweep = Sweep.from_text(paradigms_text(data, REWIND), directory=tmp_path)
    parent = next(t for t in sweep.trials if t.kind == "pretrain")
    store, env = Store(tmp_path), WorkerEnv(str(tmp_path))
    store.create()
    torch.set_num_threads(1)
    _, straight = h.assert_resume_exact(parent, store, env, tmp_path / "state.pt")
    assert sorted(torch.load(tmp_path / "state.pt", weights_only=True)["snapshots"]) == [3]
    resumed = build_trial(parent, store, env)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    while not resumed.finished:
        resumed.train_epoch()
    snapshots = resumed.final_state()["snapshots"]
    assert sorted(snapshots) == sorted(straight["snapshots"]) == [3, 5]
    for step, state in straight["snapshots"].items():
        assert all(torch.equal(state[k], snapshots[step][k]) for k in state), step


def test_rewind_to_init_and_sweeps_without_early_steps_keep_their_ids():
    ticket = Sweep.from_text(one_method('name = "lottery"')).trials
    assert [t.id for t in Sweep.from_text(one_method('name = "lottery"\nrewind_step = 0')).trials] == \
        [t.id for t in ticket]
    assert all("snapshot_steps" not in t.config and "rewind_step" not in str(t.config) for t in ticket)
    # a step-k ticket gives its parent (and so the parent's other children) a new id; the same parent
    # without its snapshot steps is the parent of a sweep without the step-k ticket
    plain = Sweep.from_text(one_method('name = "gmp"')).trials
    mixed = Sweep.from_text(h.tiny_sweep_text(Path("/unused"), "[methods.M]\nname = \"gmp\"\n[methods.K]\n"
                                              "name = \"lottery\"\nrewind_step = 4\n")).trials
    plain_parents = [t for t in plain if t.kind == "pretrain"]
    mixed_parents = [t for t in mixed if t.kind == "pretrain"]
    assert len(plain_parents) == len(mixed_parents) == 2
    for a, b in zip(plain_parents, mixed_parents):
        assert "snapshot_steps" not in a.config and b.config["snapshot_steps"] == [4]
        assert a.id != b.id and trial_id({k: v for k, v in b.config.items() if k != "snapshot_steps"}) == a.id
    ids = {t.id for t in mixed}
    assert all(t.parent in ids and t.config["parent"] == t.parent for t in mixed if t.kind == "prune")
    assert all(t.id == trial_id(t.config) for t in mixed)


def test_ticket_asking_for_a_step_its_parent_did_not_save_is_an_error(tmp_path, data):
    text = paradigms_text(data, REWIND).replace("sparsity = [0.5, 0.8]", "sparsity = [0.8]")
    sweep = Sweep.from_text(text, directory=tmp_path)
    torch.set_num_threads(1)
    store, env = _store_with_parents(sweep, tmp_path)
    parent = next(t for t in sweep.trials if t.kind == "pretrain")
    saved = torch.load(store.model(parent.id), weights_only=True)
    save_torch({**saved, "snapshots": {3: saved["snapshots"][3]}}, store.model(parent.id))
    spec = next(t for t in sweep.trials if t.labels.get("method") == "ticket-k")
    with pytest.raises(ValueError, match=r"rewind_step=5: the dense parent saved no weights after step 5 \(its "
                                         r"model.pt 'snapshots' has steps \[3\]\)"):
        build_trial(spec, store, env)
