"""Sweep files: grid expansion, include/exclude, validation errors with file and line, trial ids."""
import hashlib
from pathlib import Path

import pytest

from sparse_engine.sweep import METHODS, Method, Sweep, SweepFileError, config_id, pack_units, register_method
from sparse_engine.sweep.fields import Field, integer
from sparse_engine.sweep.source import parse_override

REPO = Path(__file__).resolve().parent.parent
BASE = """name = "t"
[data]
train_size = 256
[pretrain]
epochs = 2
[train]
epochs = 3
[models.mlp]
name = "fashion_mlp"
[models.small]
name = "second_order_mlp"
[methods.one-shot]
name = "one_shot"
[methods.ERK]
name = "one_shot"
allocation = "erk"
[methods.GMP]
name = "gmp"
[grid]
sparsity = [0.5, 0.9]
seed = [0, 1, 2]
"""


def plan(text: str, **overrides):
    return Sweep.from_text(text, overrides=overrides or None, name="sweep.toml").trials


def prune_trials(text: str, **overrides):
    return [t for t in plan(text, **overrides) if t.kind == "prune"]


def problems_of(text: str) -> list:
    with pytest.raises(SweepFileError) as e:
        plan(text)
    return e.value.problems


def test_grid_is_the_cartesian_product_with_shared_parents():
    trials = plan(BASE)
    prune = [t for t in trials if t.kind == "prune"]
    assert len(prune) == 2 * 3 * 2 * 3  # model x method x sparsity x seed
    assert {(t.labels["model"], t.labels["method"], t.labels["sparsity"], t.labels["seed"]) for t in prune} == {
        (m, x, s, seed) for m in ("mlp", "small") for x in ("one-shot", "ERK", "GMP") for s in (0.5, 0.9)
        for seed in (0, 1, 2)}
    parents = [t for t in trials if t.kind == "pretrain"]
    assert len(parents) == 2 * 3  # one dense parent per model and seed, shared by every method and sparsity
    assert trials[:len(parents)] == parents  # parents first
    for t in prune:
        parent = next(p for p in parents if p.id == t.parent)
        assert (parent.labels["model"], parent.labels["seed"]) == (t.labels["model"], t.labels["seed"])
    assert len({t.id for t in trials}) == len(trials)


def test_include_and_exclude():
    text = BASE + """
[[exclude]]
model = "small"
method = ["ERK", "GMP"]
[[exclude]]
sparsity = 0.9
seed = 2
[[include]]
method = "GMP"
sparsity = 0.99
model = "small"
"""
    prune = prune_trials(text)
    keys = {(t.labels["model"], t.labels["method"], t.labels["sparsity"], t.labels["seed"]) for t in prune}
    assert not any(m == "small" and x in ("ERK", "GMP") and s != 0.99 for m, x, s, _ in keys)
    assert not any(s == 0.9 and seed == 2 for _, _, s, seed in keys)
    # the include's missing axis (seed) takes every grid value
    assert {k for k in keys if k[2] == 0.99} == {("small", "GMP", 0.99, seed) for seed in (0, 1, 2)}
    assert len(prune) == 3 * 2 * 3 - 3 + 1 * 2 * 3 - 1 + 3  # mlp: 18 - 3 (0.9, seed 2); small: 6 - 1; + 3


def test_override_axes_and_set():
    text = BASE.replace("seed = [0, 1, 2]", 'seed = [0]\n"train.epochs" = [1, 4]')
    prune = prune_trials(text)
    assert sorted({t.config["train"]["epochs"] for t in prune}) == [1, 4]
    assert len(prune) == 2 * 3 * 2 * 2
    assert {t.parent for t in prune if t.labels["model"] == "mlp"} == {
        next(t.parent for t in prune if t.labels["model"] == "mlp")}  # retraining axes share the parent
    assert parse_override("train.epochs=3") == ("train.epochs", 3)
    assert parse_override("data.dir=/x/y") == ("data.dir", "/x/y")
    assert parse_override("grid.sparsity=[0.5]") == ("grid.sparsity", [0.5])
    only = prune_trials(BASE, **{"grid.sparsity": [0.7], "grid.model": ["mlp"], "grid.seed": [0]})
    assert {(t.labels["sparsity"], t.labels["model"]) for t in only} == {(0.7, "mlp")} and len(only) == 3


def test_ids_are_stable_and_hash_only_what_decides_results():
    base = {t.labels["method"] + str(t.labels["sparsity"]) + t.labels["model"] + str(t.labels["seed"]): t.id
            for t in prune_trials(BASE)}
    # defaults written out, ints for floats, labels renamed, data.dir and [run] added: the same ids
    explicit = BASE.replace('name = "gmp"', 'name = "gmp"\nprunes = 10\nspan = 0.75\nstart = 0')
    explicit = explicit.replace("[train]\n", '[train]\nlr_schedule = "clr"\nbatch_size = 128\n')
    explicit = explicit.replace("[data]\n", '[data]\ndir = "/somewhere/else"\n') + "[run]\nworkers = 2\n"
    explicit = 'metrics = ["accuracy"]\n' + explicit  # what is measured at the end is not the training
    assert {t.id for t in prune_trials(explicit)} == set(base.values())
    renamed = BASE.replace("[methods.GMP]", "[methods.gradual]").replace("[models.mlp]", "[models.big]")
    assert {t.id for t in prune_trials(renamed)} == set(base.values())
    # a changed option, budget or seed is a different trial; its parent only changes with pretraining
    changed = {t.labels["method"] + str(t.labels["sparsity"]) + t.labels["model"] + str(t.labels["seed"]): t
               for t in prune_trials(BASE.replace('name = "gmp"', 'name = "gmp"\nprunes = 5'))}
    for key, trial_id in base.items():
        assert (changed[key].id == trial_id) == (not key.startswith("GMP"))
    parents = {t.id for t in plan(BASE) if t.kind == "pretrain"}
    assert {t.id for t in plan(BASE.replace("epochs = 3", "epochs = 4")) if t.kind == "pretrain"} == parents
    assert not {t.id for t in plan(BASE.replace("epochs = 2", "epochs = 5")) if t.kind == "pretrain"} & parents
    # the hash of the canonical JSON text (sorted keys, no spaces): pinned, since a change of the
    # canonical form would rerun every user's sweep
    canonical = hashlib.sha256(b'{"a":[1,"x"],"b":1.0}').hexdigest()[:16]
    assert config_id({"b": 1.0, "a": [1, "x"]}) == config_id({"a": [1, "x"], "b": 1.0}) == canonical


def test_unknown_keys_and_bad_values_name_the_key_file_and_line():
    text = BASE.replace('allocation = "erk"', 'allocation = "erk"\nphasess = 3').replace(
        "[train]\nepochs = 3", "[train]\nepochs = 0").replace("sparsity = [0.5, 0.9]", "sparsity = [0.5, 1.0]")
    problems = problems_of(text)
    lines = text.splitlines()
    assert len(problems) == 3, problems

    def line(needle):
        return next(i for i, s in enumerate(lines, 1) if s.startswith(needle))
    assert any(p.startswith(f"sweep.toml:{line('phasess')}: methods.ERK.phasess: unknown key") and "allocation" in p
               for p in problems), problems
    assert any(p.startswith(f"sweep.toml:{line('epochs = 0')}: train.epochs: expected an integer >= 1") for p in
               problems), problems
    assert any(p.startswith(f"sweep.toml:{line('sparsity = [0.5, 1.0]')}: grid.sparsity: value 1:") and "[0, 1)" in p
               for p in problems), problems


@pytest.mark.parametrize("edit,expected", [
    (('name = "gmp"', 'name = "gmq"'), "methods.GMP.name: expected a method of the registry"),
    (('name = "fashion_mlp"', 'name = "resnet19"'), "models.mlp.name: expected one of"),
    (('name = "fashion_mlp"', 'name = "fashion_mlp"\noptions = {num_classes = 10, width = 3}'),
     "models.mlp.options.width: unknown key"),
    (('name = "gmp"', 'name = "gmp"\nlr_schedule = "allr"'), "methods.GMP.lr_schedule: expected one of"),
    (('name = "gmp"', 'name = "no_such_module_xyz:f"'), "cannot import module 'no_such_module_xyz'"),
    (("seed = [0, 1, 2]", "seed = [0, 0]"), "grid.seed: repeated values"),
    (("seed = [0, 1, 2]", "seeds = [0]"), "grid.seeds: unknown axis"),
    (("[pretrain]\nepochs = 2", "[pretrain]\nepochs = 2\noptimizer = {name = \"adam\"}"),
     "pretrain.optimizer.name: expected one of 'sgd', 'adamw'"),
    (("[data]\n", "[data]\nname = \"mnist\"\n"), "data.name: expected one of fashion_mnist"),
    (("train_size = 256", "train_size = 256\nsubset = 3"), "data.subset: unknown key"),
    (("[pretrain]\nepochs = 2", "[pretrain]"), "pretrain.epochs: missing: method"),
])
def test_bad_input_is_an_error_that_names_the_key(edit, expected):
    assert any(expected in p for p in problems_of(BASE.replace(*edit))), problems_of(BASE.replace(*edit))


def test_grid_values_are_checked_where_the_grid_sets_them():
    text = BASE.replace("seed = [0, 1, 2]", 'seed = [0]\n"train.epochs" = [2, -1]')
    (problem,) = problems_of(text)
    grid_line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith('"train.epochs"'))
    assert problem.startswith(f'sweep.toml:{grid_line}: grid."train.epochs": train.epochs: expected an integer >= 1')


def test_toml_syntax_error_has_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BASE.replace("epochs = 3", "epochs = = 3"))
    with pytest.raises(SweepFileError, match=r"bad.toml: .*line 7"):
        Sweep.from_file(path)
    with pytest.raises(SweepFileError, match="cannot read the sweep file"):
        Sweep.from_file(tmp_path / "missing.toml")


def test_same_trial_under_two_labels_is_refused():
    text = BASE + '[methods.also-one-shot]\nname = "one_shot"\nallocation = "global"\n'
    assert any("same resolved config" in p for p in problems_of(text))


def test_registry_and_user_methods():
    calls = []

    def build(ctx, strength):
        calls.append(strength)
    register_method("test-registered", Method(build, {"strength": Field(integer(1), 2)}))
    try:
        text = BASE + '[methods.mine]\nname = "test-registered"\n[methods.theirs]\nname = "sweep_helpers:explode"\n' \
                      'when = "step"\n'
        prune = prune_trials(text)
        mine = next(t for t in prune if t.labels["method"] == "mine")
        assert mine.config["method"] == {"name": "test-registered", "options": {"strength": 2}}
        theirs = next(t for t in prune if t.labels["method"] == "theirs")
        assert theirs.config["method"]["options"] == {"when": "step"}
        assert any("methods.mine.strength: expected an integer >= 1" in p
                   for p in problems_of(text.replace('name = "test-registered"', 'name = "test-registered"\n'
                                                                                 'strength = 0')))
        assert any("methods.theirs.how: unknown key" in p for p in problems_of(text + 'how = 1\n'))
        with pytest.raises(ValueError, match="already registered"):
            register_method("test-registered", METHODS["gmp"])
    finally:
        METHODS.pop("test-registered")


def test_example_sweep_files_are_valid():
    demo = Sweep.from_file(REPO / "examples" / "demo.toml")
    prune = [t for t in demo.trials if t.kind == "prune"]
    assert len(prune) == 2 * 8 * 3 and len(demo.trials) == len(prune) + 2
    grid = Sweep.from_file(REPO / "examples" / "fashion_mnist_grid.toml")
    assert len({t.labels["seed"] for t in grid.trials}) >= 3
    assert all(t.config["device"] == "cuda" for t in grid.trials)


def test_units_group_trials_that_could_be_stacked():
    text = BASE.replace("seed = [0, 1, 2]", 'seed = [0]\n"train.batch_size" = [64, 128]')
    prune = prune_trials(text)
    keys = {t.group_key() for t in prune}
    # model x batch size: method, sparsity and seed do not change the group
    assert len(keys) == 4
    assert pack_units(prune, free_slots=3) == [[t] for t in prune[:3]]
    units = pack_units(prune, free_slots=2, stack=4)
    assert [len(u) for u in units] == [4, 4] and all(len({t.group_key() for t in u}) == 1 for u in units)
    assert units[0][0] is prune[0]
    for u in units:  # the first ready trials of their group, in order
        assert u == [t for t in prune if t.group_key() == u[0].group_key()][:4]
