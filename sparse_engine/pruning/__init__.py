"""Pruning: choosing masks for the sparse layers of a model.

Three sub-packages, each with one face:

* ``select``: scores, layer-wise allocation, granularity and ``prune_`` (everything that chooses a
  mask; every mask is chosen through ``sparse_engine.ops.topk_mask``);
* ``methods``: pruners that change masks during training (``OneShot``, ``IMP`` with lottery
  tickets, ``GMP``, ``Cyclical``, ``FGGP``, ``PruneAtInit``, ``SET``, ``RigL``), sparsity schedules,
  retraining LR schedules, BatchNorm recalibration;
* ``second_order``: layer-wise OBS (SparseGPT) and CHITA/CHITA++.

Every public name is also importable from ``sparse_engine.pruning`` itself, and the module paths
of the flat layout before these sub-packages (``sparse_engine.pruning.scores``, ``.chita``, ...)
still import.
"""
import importlib
import sys

from sparse_engine.pruning.methods import *  # noqa: F401,F403
from sparse_engine.pruning.methods import __all__ as _methods_all
from sparse_engine.pruning.second_order import *  # noqa: F401,F403
from sparse_engine.pruning.second_order import __all__ as _second_order_all
from sparse_engine.pruning.select import *  # noqa: F401,F403
from sparse_engine.pruning.select import __all__ as _select_all

__all__ = _select_all + _methods_all + _second_order_all

# The flat layout's module paths, kept importable (``import sparse_engine.pruning.chita``).
_MOVED_MODULES = {
    "scores": "select.scores", "allocation": "select.allocation", "granularity": "select.granularity",
    "prune": "select.prune", "magnitude": "select.magnitude",
    "pruner": "methods.pruner", "imp": "methods.imp", "methods": "methods.pruners", "schedules": "methods.schedules",
    "lr_schedules": "methods.lr_schedules", "bn_recalibration": "methods.bn_recalibration",
    "obs": "second_order.obs", "chita": "second_order.chita", "chita_solver": "second_order.chita_solver",
}
for _old, _new in _MOVED_MODULES.items():
    if _old != "methods":  # ``sparse_engine.pruning.methods`` is now the package, a superset of the old module
        sys.modules.setdefault(f"{__name__}.{_old}", importlib.import_module(f"{__name__}.{_new}"))
