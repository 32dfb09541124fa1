"""From a sweep file to the trials it declares: grid expansion, resolved configs and trial ids.

A **trial** is one training run: its config is fully resolved (every default filled in, numbers in
canonical types), and its id is a hash of that config in canonical JSON, so the same trial gets
the same id in any sweep file that declares it, and re-running a sweep runs nothing twice.
Presentation (labels of models and methods), locations (``data.dir``) and the final metrics are not
part of it.

Two kinds: ``pretrain`` trials train a dense parent (model, data, pretraining settings, seed,
device), once, and ``prune`` trials start from their parent's checkpoint (or, for methods that
prune at initialisation, from a fresh model) and prune and retrain it. Like open_lth's
train/lottery split, the parent has an id of its own, and every pruning trial that needs the same
parent shares it. A parent whose children read its model at early steps (a ticket's ``rewind_step``)
saves it there: those steps are part of its config (``snapshot_steps``) only then.

Grid: ``[grid]`` lists the axes: ``model`` and ``method`` (labels of ``[models.*]`` and
``[methods.*]``; default: every one defined), ``sparsity``, ``seed`` (default ``[0]``), and any
``data.*``, ``pretrain.*`` or ``train.*`` key (e.g. ``"train.epochs" = [3, 6]``). Their Cartesian
product are the trials. ``[[exclude]]`` entries drop the grid points that match all their keys (a
list matches any of its values); ``[[include]]`` entries add trials: lists expand, and an axis
left out takes every value of the grid's.
"""
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from sparse_engine.pruning.methods.lr_schedules import RETRAIN_SCHEDULES
from sparse_engine.sweep import components, settings
from sparse_engine.sweep.fields import (Field, Invalid, array, check_table, choice, integer, one_of_names, real, string,
                                        table)
from sparse_engine.sweep.methods import TRIAL_LR_SCHEDULES, lookup_method, resolve_method
from sparse_engine.sweep.metrics import lookup_metric
from sparse_engine.sweep.source import Problems, SweepSource, apply_overrides, dotted

CONFIG_VERSION = 1
TOP_FIELDS = {
    "name": Field(string, None), "directory": Field(string, None, "where the sweep's store goes"),
    "device": Field(choice("cpu", "cuda"), "cpu"), "metrics": Field(array, ["accuracy", "loss"]),
    "data": Field(table, {}), "pretrain": Field(table, {}), "train": Field(table, doc="the retraining settings"),
    "models": Field(table, doc="[models.LABEL] tables"), "methods": Field(table, doc="[methods.LABEL] tables"),
    "grid": Field(table, doc="the axes: sparsity = [...], ..."), "include": Field(array, []),
    "exclude": Field(array, []), "run": Field(table, {}),
}
OVERRIDABLE = ("data", "pretrain", "train")


def canonical_json(config: Any) -> str:
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def config_id(config: Any) -> str:
    """16 hex digits of the SHA-256 of the config's canonical JSON."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:16]


def trial_id(config: dict) -> str:
    """A trial's id: the hash of its config without ``metrics`` (what is measured at the end does
    not change the training; a metric added later is computed for new trials, and the final
    models in ``trials/ID/model.pt`` can be evaluated afresh)."""
    return config_id({k: v for k, v in config.items() if k != "metrics"})


@dataclass(frozen=True)
class TrialSpec:
    """What a trial is. ``config`` is the resolved config the ``id`` hashes; ``parent`` the id of
    the pretrain trial it starts from (None for pretrain trials and init-pruning methods);
    ``labels`` how reports name it; ``data_dir`` where its data files are (not hashed)."""
    id: str
    kind: str
    config: dict
    parent: Optional[str] = None
    labels: dict = field(default_factory=dict)
    data_dir: Optional[str] = None

    @property
    def epochs(self) -> int:
        return self.config["pretrain"]["epochs"] if self.kind == "pretrain" else self.config["train"]["epochs"]

    def group_key(self) -> str:
        """Trials with equal keys can be trained as one stacked model (``sweep/stacked.py``): trials of
        one kind (dense parents, or pruning trials of a method that can run in a stack:
        ``Method.stackable``) that share architecture, data, batch size, step count and device, with
        optimizers that differ at most in learning rate and weight decay (the stacked optimizers'
        per-model hyperparameters). Any other trial's key is its own (it runs alone)."""
        if self.kind == "prune":
            method = lookup_method(self.config["method"]["name"])
            if method.stackable is None or not method.stackable(self.config):
                return self.id
        stage = self.config["pretrain" if self.kind == "pretrain" else "train"]
        shared = {k: v for k, v in stage["optimizer"].items() if k not in ("lr", "weight_decay")}
        return canonical_json([self.kind, self.config["model"], self.config["data"], stage["batch_size"],
                               stage["epochs"], self.config["device"], shared])

    def describe(self) -> str:
        if self.kind == "pretrain":
            return f"{self.labels.get('model')} dense (seed {self.labels.get('seed')})"
        return (f"{self.labels.get('model')} {self.labels.get('method')} @ {self.labels.get('sparsity', 0):.4g} "
                f"(seed {self.labels.get('seed')})")


@dataclass
class SweepPlan:
    """Every trial of a sweep file (parents first), its name, directory and run settings."""
    name: str
    directory: Optional[str]
    trials: list
    run: dict
    source: SweepSource

    def fingerprint(self) -> str:
        return config_id(sorted(t.id for t in self.trials))

    def by_id(self) -> dict:
        return {t.id: t for t in self.trials}


class _Axes:
    """The grid's axes and their checked values."""

    def __init__(self, data: dict, problems: Problems, models: list, methods: list):
        self.problems, self.models, self.methods = problems, models, methods
        grid = data.get("grid")
        if not isinstance(grid, dict):
            problems.add(("grid",), "expected a table of axes, e.g. [grid] sparsity = [0.9, 0.95]")
            grid = {}
        if "sparsity" not in grid:
            problems.add(("grid", "sparsity"), "missing (required: the target sparsities, e.g. [0.9, 0.95])")
        grid = {"model": models, "method": methods, "seed": [0], **grid}
        self.values = {}
        for axis, values in grid.items():
            checked = self.check(axis, values, ("grid", axis))
            if checked is not None:
                self.values[axis] = checked

    def check(self, axis: str, values, path) -> Optional[list]:
        if axis in ("model", "method", "sparsity", "seed"):
            check = {"model": one_of_names(self.models, "models"), "method": one_of_names(self.methods, "methods"),
                     "sparsity": real(0, 1, high_open=True), "seed": integer(0)}[axis]
        elif axis.split(".")[0] in OVERRIDABLE and "." in axis:
            check = None  # checked when the trials' tables are resolved
        else:
            self.problems.add(path, "unknown axis; expected model, method, sparsity, seed or a data.*, pretrain.* "
                                    "or train.* key")
            return None
        values = values if isinstance(values, list) else [values]
        if not values:
            self.problems.add(path, "expected at least one value")
            return None
        out = []
        for i, v in enumerate(values):
            try:
                out.append(v if check is None else check(v))
            except Invalid as e:
                self.problems.add(path, f"value {i}: {e}")
                return None
        if len({canonical_json(v) for v in out}) != len(out):
            self.problems.add(path, f"repeated values in {values!r}")
            return None
        return out

    def points(self, include: list, exclude: list) -> list:
        """The grid's points minus excluded ones, plus included ones (dicts axis -> value)."""
        axes = list(self.values)
        points = [dict(zip(axes, combo)) for combo in itertools.product(*(self.values[a] for a in axes))]
        for kind, entries in (("exclude", exclude), ("include", include)):
            if not isinstance(entries, list):
                self.problems.add((kind,), f"expected [[{kind}]] tables, got {entries!r}")
                continue
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict) or not entry:
                    self.problems.add((kind, i), "expected a table of axis = value(s)")
                    continue
                checked = {a: self.check(a, v, (kind, i, a)) for a, v in entry.items()}
                if any(v is None for v in checked.values()):
                    continue
                if kind == "exclude":
                    points = [p for p in points if not all(p.get(a) in vs for a, vs in checked.items())]
                else:
                    space = {**self.values, **checked}
                    points += [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
        return points


class _OverrideProblems(Problems):
    """Problems of a table resolved with grid values: reported at the grid key that set them."""

    def __init__(self, problems: Problems, overridden: dict):
        super().__init__(problems.source)
        self.items, self.overridden = problems.items, overridden

    def add(self, path, message):
        for key, grid_path in self.overridden.items():
            if tuple(path[:len(key)]) == key:
                message = f"{dotted(path)}: {message}"
                path = grid_path
                break
        super().add(path, message)


def _labelled(tables: Any, what: str, resolve, problems: Problems) -> dict:
    if not isinstance(tables, dict) or not tables:
        problems.add((what,), f"expected at least one [{what}.LABEL] table")
        return {}
    return {label: resolve(values, (what, label), problems) for label, values in tables.items()}


def _resolve_point(point: dict, data: dict, models: dict, methods: dict, top: dict, problems: Problems):
    overrides = {a: v for a, v in point.items() if a.split(".")[0] in OVERRIDABLE}
    merged = apply_overrides({k: data.get(k, {}) for k in OVERRIDABLE}, overrides)
    grid_paths = {tuple(a.split(".")): ("grid", a) for a in overrides}
    local = _OverrideProblems(problems, grid_paths)
    data_cfg = components.resolve_data(merged["data"], ("data",), local)
    pretrain = settings.resolve_pretrain(merged["pretrain"], ("pretrain",), local)
    train = settings.resolve_train(merged["train"], pretrain and pretrain["optimizer"], ("train",), local)
    model, method = models.get(point["model"]), methods.get(point["method"])
    if None in (data_cfg, pretrain, train, model, method):
        return None
    entry = lookup_method(method["name"])
    schedule = method["lr_schedule"] or train["lr_schedule"]
    allowed = RETRAIN_SCHEDULES + ("constant",) if entry.owns_lr else TRIAL_LR_SCHEDULES
    path = ("methods", point["method"])
    if schedule not in allowed:
        local.add(path, f"lr_schedule {schedule!r}: method {method['name']!r} takes one of {', '.join(allowed)}")
        return None
    common = {"v": CONFIG_VERSION, "model": model, "data": components.identity(data_cfg), "seed": point["seed"],
              "device": top["device"], "metrics": top["metrics"]}
    labels = {k: v for k, v in point.items()}
    parent = None
    if entry.start == "parent":
        if pretrain["epochs"] is None:
            local.add(("pretrain", "epochs"), f"missing: method {point['method']!r} prunes a trained dense parent")
            return None
        if not _parent_steps_exist(entry, method["options"], data_cfg, pretrain, path, local):
            return None
        pre_config = {"kind": "pretrain", **common, "pretrain": pretrain}
        parent = TrialSpec(trial_id(pre_config), "pretrain", pre_config, None,
                           {"model": point["model"], "seed": point["seed"]}, data_cfg["dir"])
    elif schedule in ("slr", "lrw"):
        local.add(path, f"lr_schedule {schedule!r} replays the parent's schedule; method {method['name']!r} has none")
        return None
    config = {"kind": "prune", **common, "parent": parent and parent.id,
              "pretrain": pretrain if parent else None,
              "train": {**train, "lr_schedule": schedule},
              "method": {"name": method["name"], "options": method["options"]}, "sparsity": point["sparsity"]}
    return parent, TrialSpec(trial_id(config), "prune", config, parent and parent.id, labels, data_cfg["dir"])


def _parent_steps_exist(entry, options: dict, data: dict, pretrain: dict, path, problems: Problems) -> bool:
    """The parent steps the method reads (``Method.parent_steps``) lie within the parent's training
    (checked here when ``data.train_size`` gives the step count; else when the trial starts)."""
    if entry.parent_steps is None or data["train_size"] is None:
        return True
    total = pretrain["epochs"] * -(-data["train_size"] // pretrain["batch_size"])
    late = {key: k for key, k in entry.parent_steps(options).items() if k >= total}
    for key, k in late.items():
        problems.add(path + (key,), f"expected a step below the dense parent's {total} optimizer steps "
                                    f"(pretrain.epochs x ceil(data.train_size / pretrain.batch_size)), got {k}")
    return not late


def _with_snapshots(trials: dict) -> dict:
    """Parents that save their model after the steps their children's methods read
    (``Method.parent_steps``, e.g. a ticket's ``rewind_step``): the steps join a parent's config as
    ``snapshot_steps`` (hence its id and its children's) only when there are some, so the parents of
    sweeps that need none keep their ids and files."""
    wanted: dict = {}
    for t in trials.values():
        entry = lookup_method(t.config["method"]["name"]) if t.kind == "prune" and t.parent else None
        if entry is not None and entry.parent_steps is not None:
            wanted.setdefault(t.parent, set()).update(entry.parent_steps(t.config["method"]["options"]).values())
    renamed, out = {}, {}
    for t in trials.values():
        config = None
        if t.kind == "pretrain" and wanted.get(t.id):
            config = {**t.config, "snapshot_steps": sorted(wanted[t.id])}
            renamed[t.id] = trial_id(config)
        elif t.kind == "prune" and t.parent in renamed:
            config = {**t.config, "parent": renamed[t.parent]}
        if config is not None:
            t = dataclasses.replace(t, id=trial_id(config), config=config, parent=config.get("parent"))
        out[t.id] = t
    return out


def plan_sweep(source: SweepSource, overrides: Optional[dict] = None) -> SweepPlan:
    """Check a sweep file (with ``overrides``, ``{"dotted.key": value}``) and list its trials.
    Raises ``SweepFileError`` listing every problem, with file and line."""
    problems = Problems(source)
    data = apply_overrides(source.data, overrides)
    top = check_table(data, TOP_FIELDS, (), problems).values
    metrics = top.get("metrics") or []
    for i, name in enumerate(metrics):
        try:
            lookup_metric(string(name))
        except Invalid as e:
            problems.add(("metrics", i), str(e))
    models = _labelled(data.get("models"), "models", components.resolve_model, problems)
    methods = _labelled(data.get("methods"), "methods", resolve_method, problems)
    run = settings.resolve_run(data.get("run", {}), ("run",), problems)
    axes = _Axes(data, problems, list(models), list(methods))
    # The tables as written (grid points resolve them again with their overrides).
    components.resolve_data(data.get("data", {}), ("data",), problems)
    pretrain = settings.resolve_pretrain(data.get("pretrain", {}), ("pretrain",), problems)
    settings.resolve_train(data.get("train"), pretrain and pretrain["optimizer"], ("train",), problems)
    problems.raise_if_any()
    trials: dict = {}
    for point in axes.points(data.get("include", []), data.get("exclude", [])):
        resolved = _resolve_point(point, data, models, methods, top, problems)
        if resolved is None:
            continue
        for spec in resolved:
            if spec is None:
                continue
            twin = trials.setdefault(spec.id, spec)
            if spec.kind == "prune" and twin.labels != spec.labels:
                problems.add(("methods", spec.labels["method"]),
                             f"the trial {spec.describe()} is the same as {twin.describe()} (same resolved config)")
    problems.raise_if_any()
    trials = _with_snapshots(trials)
    if not any(t.kind == "prune" for t in trials.values()):
        problems.add(("grid",), "declares no trial (every grid point is excluded)")
        problems.raise_if_any()
    ordered = [t for t in trials.values() if t.kind == "pretrain"] + [t for t in trials.values() if t.kind == "prune"]
    name = top.get("name") or source.name.rsplit("/", 1)[-1].removesuffix(".toml")
    return SweepPlan(name, top.get("directory"), ordered, run, source)
