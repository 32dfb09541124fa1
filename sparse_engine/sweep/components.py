"""Models and data sets a sweep file can name: built in, or the user's own as import paths.

Models: a name of ``sparse_engine.models.MODELS`` (``fashion_mlp``, ``fashion_cnn``,
``second_order_mlp``, ...) built by ``build_model``, or ``package.module:function`` returning an
``nn.Module``; ``options`` are the builder's keyword arguments (checked against its signature).

Data: ``fashion_mnist`` (``sparse_engine.data.load_fashion_mnist``, from Debian's package or
``dir``), or ``package.module:function`` returning ``(x_train, y_train, x_test, y_test)`` tensors
(called with ``options``, and ``data_dir=dir`` when ``dir`` is set). ``train_size`` keeps a random
subset of the training set (drawn with ``subset_seed``), ``test_size`` the first test examples.
``dir`` is where the files are, not what they are: it is not part of a trial's identity.
"""
import functools
import json
from typing import Any, Optional

import torch
from torch import nn

from sparse_engine.models import MODELS, build_model
from sparse_engine.sweep.fields import (Field, Invalid, check_table, integer, is_import_path, optional, string,
                                        table)
from sparse_engine.sweep.methods import import_object, signature_options
from sparse_engine.sweep.source import KeyPath, Problems

BUILTIN_DATA = ("fashion_mnist",)

MODEL_FIELDS = {"name": Field(string, doc=f"one of {', '.join(sorted(MODELS))} or 'package.module:function'"),
                "options": Field(table, {}, "the builder's keyword arguments")}
DATA_FIELDS = {
    "name": Field(string, "fashion_mnist", "fashion_mnist or 'package.module:function'"),
    "dir": Field(optional(string), None, "directory of the data files (not part of the trial id)"),
    "train_size": Field(optional(integer(1)), None, "training examples kept (a seeded random subset)"),
    "subset_seed": Field(integer(0), 0, "seed of the training subset"),
    "test_size": Field(optional(integer(1)), None, "test examples kept (the first ones)"),
    "options": Field(table, {}, "keyword arguments of a user data function"),
}


def _builder(name: str):
    if is_import_path(name):
        fn = import_object(name)
        if not callable(fn):
            raise Invalid(f"{name!r} is not callable")
        return fn
    if name not in MODELS:
        raise Invalid(f"expected one of {', '.join(sorted(MODELS))} or 'package.module:function', got {name!r}")
    return MODELS[name]


def _check_options(fn, options: dict, skip: int, path: KeyPath, problems: Problems) -> Optional[dict]:
    schema = signature_options(fn, skip)
    if schema is None:
        return dict(options)
    checked = check_table(options, schema, path, problems)
    return checked.values if checked.ok else None


def resolve_model(values: Any, path: KeyPath, problems: Problems) -> Optional[dict]:
    """A model table -> ``{"name", "options"}`` (options defaulted from the builder's signature)."""
    checked = check_table(values, MODEL_FIELDS, path, problems)
    if not checked.ok:
        return None
    try:
        fn = _builder(checked.values["name"])
    except Invalid as e:
        problems.add(path + ("name",), str(e))
        return None
    options = _check_options(fn, checked.values["options"], 0, path + ("options",), problems)
    return None if options is None else {"name": checked.values["name"], "options": options}


def resolve_data(values: Any, path: KeyPath, problems: Problems) -> Optional[dict]:
    checked = check_table(values, DATA_FIELDS, path, problems)
    if not checked.ok:
        return None
    data = checked.values
    if is_import_path(data["name"]):
        try:
            fn = import_object(data["name"])
        except Invalid as e:
            problems.add(path + ("name",), str(e))
            return None
        options = _check_options(fn, data["options"], 0, path + ("options",), problems)
        if options is None:
            return None
        data["options"] = options
    elif data["name"] not in BUILTIN_DATA:
        problems.add(path + ("name",), f"expected one of {', '.join(BUILTIN_DATA)} or 'package.module:function', "
                                       f"got {data['name']!r}")
        return None
    elif data["options"]:
        problems.add(path + ("options",), f"the built-in data set {data['name']!r} takes no options")
        return None
    return data


def build(model: dict) -> nn.Module:
    """The (dense) model of a resolved model config."""
    if is_import_path(model["name"]):
        out = import_object(model["name"])(**model["options"])
        if not isinstance(out, nn.Module):
            raise TypeError(f"model {model['name']!r}: expected the builder to return an nn.Module, "
                            f"got {type(out).__name__}")
        return out
    return build_model(model["name"], **model["options"])


def identity(data: dict) -> dict:
    """The part of a data config that decides the data (``dir`` is only where it is)."""
    return {k: v for k, v in data.items() if k != "dir"}


@functools.lru_cache(maxsize=4)
def _load(key: str, data_dir: Optional[str]) -> tuple:
    data = json.loads(key)
    if is_import_path(data["name"]):
        options = dict(data["options"])
        if data_dir is not None:
            options["data_dir"] = data_dir
        tensors = import_object(data["name"])(**options)
        if not (isinstance(tensors, (tuple, list)) and len(tensors) == 4
                and all(isinstance(t, torch.Tensor) for t in tensors)):
            raise TypeError(f"data {data['name']!r}: expected (x_train, y_train, x_test, y_test) tensors")
        x_train, y_train, x_test, y_test = tensors
    else:
        from sparse_engine.data import load_fashion_mnist
        x_train, y_train = load_fashion_mnist("train", data_dir)
        x_test, y_test = load_fashion_mnist("test", data_dir)
    if data["train_size"] is not None:
        if data["train_size"] > x_train.shape[0]:
            raise ValueError(f"data.train_size={data['train_size']}: the training set has {x_train.shape[0]}")
        subset = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(data["subset_seed"]))
        subset = subset[:data["train_size"]]
        x_train, y_train = x_train[subset], y_train[subset]
    if data["test_size"] is not None:
        x_test, y_test = x_test[:data["test_size"]], y_test[:data["test_size"]]
    return x_train, y_train, x_test, y_test


def load(data: dict) -> tuple:
    """``(x_train, y_train, x_test, y_test)`` of a resolved data config, cached per process."""
    return _load(json.dumps(identity(data), sort_keys=True), data.get("dir"))
