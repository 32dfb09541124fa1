"""The settings tables of a sweep file other than models and methods: optimizer, dense pretraining
(``[pretrain]``), retraining (``[train]``) and how to run (``[run]``), each resolved to a canonical
dict with every default filled in."""
from typing import Any, Optional, Union

from sparse_engine.pruning.methods.lr_schedules import RETRAIN_SCHEDULES
from sparse_engine.sweep.fields import (Field, Invalid, boolean, check_table, choice, integer, optional, real, string,
                                        table)
from sparse_engine.sweep.methods import TRIAL_LR_SCHEDULES
from sparse_engine.sweep.source import KeyPath, Problems

OPTIMIZERS = {
    "sgd": {"lr": Field(real(0, low_open=True), 0.1), "momentum": Field(real(0, 1), 0.9),
            "weight_decay": Field(real(0), 1e-4), "nesterov": Field(boolean, False)},
    "adamw": {"lr": Field(real(0, low_open=True), 1e-3), "beta1": Field(real(0, 1, high_open=True), 0.9),
              "beta2": Field(real(0, 1, high_open=True), 0.999), "eps": Field(real(0, low_open=True), 1e-8),
              "weight_decay": Field(real(0), 1e-2)},
}
PRETRAIN_SCHEDULES = ("linear", "cosine", "constant")


def resolve_optimizer(values: Any, path: KeyPath, problems: Problems) -> Optional[dict]:
    """``{name = "sgd", lr = 0.1, ...}`` -> the canonical optimizer config of that name."""
    if not isinstance(values, dict):
        problems.add(path, f"expected a table such as {{name = \"sgd\", lr = 0.1}}, got {values!r}")
        return None
    name = values.get("name", "sgd")
    if name not in OPTIMIZERS:
        problems.add(path + ("name",), f"expected one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")
        return None
    checked = check_table({k: v for k, v in values.items() if k != "name"}, OPTIMIZERS[name], path, problems)
    return {"name": name, **checked.values} if checked.ok else None


def _lr_table(v) -> dict:
    v = {"name": v} if isinstance(v, str) else table(v)
    unknown = sorted(set(v) - {"name", "min_lr"})
    if unknown:
        raise Invalid(f"unknown key(s) {unknown}; expected name and min_lr")
    name = choice(*PRETRAIN_SCHEDULES)(v.get("name", "linear"))
    return {"name": name, "min_lr": real(0)(v.get("min_lr", 0.0 if name == "constant" else 1e-3))}


PRETRAIN_FIELDS = {
    "epochs": Field(optional(integer(1)), None, "dense training epochs of the parent"),
    "batch_size": Field(integer(1), 128),
    "optimizer": Field(table, {}),
    "lr_schedule": Field(_lr_table, {"name": "linear", "min_lr": 1e-3},
                         "linear or cosine from the optimizer's lr to min_lr, or constant"),
}


def _bn_table(v) -> Optional[dict]:
    if v is False:
        return None
    v = table(v)
    unknown = sorted(set(v) - {"images", "batch_size"})
    if unknown:
        raise Invalid(f"unknown key(s) {unknown}; expected images and batch_size, or false")
    return {"images": integer(1)(v.get("images", 1024)), "batch_size": integer(1)(v.get("batch_size", 256))}


TRAIN_FIELDS = {
    "epochs": Field(integer(1), doc="retraining epochs (the budget of every method)"),
    "batch_size": Field(integer(1), 128),
    "optimizer": Field(table, None, "default: the pretrain optimizer"),
    "lr_schedule": Field(choice(*sorted(set(TRIAL_LR_SCHEDULES) | set(RETRAIN_SCHEDULES))), "clr",
                         "retraining LR schedule"),
    "bn_recalibration": Field(_bn_table, {"images": 1024, "batch_size": 256},
                              "BatchNorm recalibration after each prune: {images, batch_size} or false"),
    "eval_every": Field(integer(0), 0, "evaluate every this many epochs (0: only at the end)"),
}

def stack_size(value: Any) -> Union[int, str]:
    """``[run] stack``: an integer >= 1, or "auto"."""
    if value == "auto":
        return value
    try:
        return integer(1)(value)
    except Invalid:
        raise Invalid(f'expected an integer >= 1 or "auto", got {value!r}') from None


RUN_FIELDS = {
    "executor": Field(choice("local", "ray"), "local"),
    "workers": Field(optional(integer(0)), None, "concurrent trials (local: processes; 0: in this process)"),
    "threads": Field(optional(integer(1)), None, "torch threads per worker (default: cores / workers)"),
    "checkpoint_every": Field(integer(1), 1, "epochs between checkpoints"),
    "stack": Field(stack_size, 1, "prune trials trained as one stacked model (sparse_engine.stack); 1: one at a "
                                  "time; \"auto\": as many as memory allows, where stacking measures faster"),
    "address": Field(optional(string), None, "Ray cluster address (default: a local Ray instance)"),
    "gpus_per_trial": Field(optional(real(0)), None, "Ray: GPUs per trial, fractions allowed"),
    "ray_num_cpus": Field(optional(integer(1)), None, "CPUs of a local Ray instance"),
}


def resolve_pretrain(values: Any, path: KeyPath, problems: Problems) -> Optional[dict]:
    checked = check_table(values, PRETRAIN_FIELDS, path, problems)
    if not checked.ok:
        return None
    out = checked.values
    out["optimizer"] = resolve_optimizer(out["optimizer"], path + ("optimizer",), problems)
    return out if out["optimizer"] is not None else None


def resolve_train(values: Any, pretrain_optimizer: Any, path: KeyPath, problems: Problems) -> Optional[dict]:
    checked = check_table(values, TRAIN_FIELDS, path, problems)
    if not checked.ok:
        return None
    out = checked.values
    if out["optimizer"] is None:
        out["optimizer"] = pretrain_optimizer
    else:
        out["optimizer"] = resolve_optimizer(out["optimizer"], path + ("optimizer",), problems)
    return out if out["optimizer"] is not None else None


def resolve_run(values: Any, path: KeyPath, problems: Problems) -> dict:
    checked = check_table(values, RUN_FIELDS, path, problems)
    return checked.values
