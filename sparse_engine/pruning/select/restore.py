"""``restore_on_error``: a model-level call either completes or leaves the model as it was.

    with restore_on_error(model, optimizer):
        ...                                   # anything that changes the model in several steps

If the block raises (any exception, ``KeyboardInterrupt`` included), everything a pruning call may
change is put back before the exception propagates:

* every parameter and buffer of ``model``: the same ``Parameter``/buffer objects (optimizers hold
  references to them, so no new ones are made), with their values at entry (a tensor replaced in
  a module is put back);
* the masks of the sparse layers (their ``mask_bits`` buffers);
* every module's attributes: train/eval mode, hooks, children, an instance ``forward`` set in the
  block (shallowly: what they refer to is not copied);
* with ``optimizer``: its state (a deep copy of every tensor), its ``param_groups`` (the learning
  rates an LR scheduler set, the ``initial_lr`` it added), every hook registered on it (a
  ``mask_optimizer`` installed in the block is removed through ``MaskedOptimizer.remove()``) and
  the attributes set on it (an LR scheduler's wrapper of ``optimizer.step``).

``mask_version`` never goes back: a layer whose mask was set in the block gets its old mask back
under a new version, so ``mask_optimizer`` treats the restore as a mask change and clears the
optimizer state at the restored pruned positions once more before its next step (state there is
already zero after a clear, so for SGD and Adam-like optimizers this changes nothing). A version
number therefore always names one mask.

Cost: one copy of the parameters and buffers (and of the optimizer state), taken on entry, on
their devices (peak memory: the model, and the optimizer state, twice). The
library uses it where a call changes the model in several steps that can fail in between:
``obs_layerwise``, ``chita``, ``chita_plus_plus``, SynFlow's rounds in ``prune_``, a pruner's
construction, IMP's phase starts, and a pruner's prune followed by BatchNorm recalibration.
A plain ``prune_`` does not copy anything: it checks its inputs and computes every mask before it
changes the first one. Every block takes its own copy, also inside another block: a caller that
catches an inner block's error and goes on relies on the inner block having restored its part.
"""
import copy
import functools
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from sparse_engine.nn.mask_optimizer import installed_maskers
from sparse_engine.nn.masked_module import MaskedModule


class _Attributes:
    """An object's attributes (``vars``), and the contents of those that are dicts, sets or lists
    (a module's ``_parameters``, ``_buffers``, ``_modules``, hook dicts; an optimizer's
    ``param_groups``, hooks, ``state``), shallowly: the objects they hold are not copied."""

    def __init__(self, obj):
        self.obj = obj
        self.attrs = dict(vars(obj))
        self.contents = {k: copy.copy(v) for k, v in self.attrs.items() if isinstance(v, (dict, set, list))}

    def restore(self) -> None:
        own = vars(self.obj)
        for name in [k for k in own if k not in self.attrs]:
            del own[name]
        own.update(self.attrs)
        for name, saved in self.contents.items():
            container = self.attrs[name]
            if isinstance(container, list):
                container[:] = saved
            else:
                container.clear()
                container.update(saved)


class ModelSnapshot:
    """What a model-level call may change, copied at construction; :meth:`restore` puts it back."""

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected None or a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.optimizer = model, optimizer
        modules = list(model.modules())
        # Each module's attributes (mode, hooks, its own parameters, buffers and children), and a
        # copy of each tensor's values (tied tensors are copied once).
        self._modules = [_Attributes(m) for m in modules]
        self._copies: dict[int, tuple[Tensor, Tensor]] = {}
        with torch.no_grad():
            for m in modules:
                for t in list(m._parameters.values()) + list(m._buffers.values()):
                    if t is not None and id(t) not in self._copies:
                        self._copies[id(t)] = (t, t.detach().clone())
        self._versions = [(m, dict(m._mask_versions)) for m in modules if isinstance(m, MaskedModule)]
        if optimizer is not None:
            self._optimizer = _Attributes(optimizer)
            self._groups = [(g, dict(g, params=list(g["params"]))) for g in optimizer.param_groups]
            self._state = {p: copy.deepcopy(s) for p, s in optimizer.state.items()}
            self._maskers = installed_maskers(optimizer)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back every parameter, buffer, mask, module attribute and the optimizer as they were."""
        versions = {id(m): dict(m._mask_versions) for m, _ in self._versions}
        for attributes in self._modules:
            attributes.restore()
        for t, saved in self._copies.values():
            _copy_back(t, saved)
        for m, old in self._versions:
            for name, version in old.items():  # one version per masked weight
                now = versions[id(m)].get(name, version)
                if now != version:
                    m._mask_versions[name] = now + 1  # the old mask under a new version (module docstring)
        if self.optimizer is not None:
            self._restore_optimizer()

    def _restore_optimizer(self) -> None:
        for masker in installed_maskers(self.optimizer):
            if all(masker is not m for m in self._maskers):
                masker.remove()  # a mask_optimizer installed in the block
        self._optimizer.restore()  # its attributes, hooks, param_groups list, maskers list, state dict
        for g, saved in self._groups:
            g.clear()
            g.update(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(self._state)


def _copy_back(t: Tensor, saved: Tensor) -> None:
    if t.shape == saved.shape and t.dtype == saved.dtype and t.device == saved.device:
        t.copy_(saved)
    else:
        t.data = saved  # resized or moved in the block: the object keeps its identity, the values come back


@contextmanager
def restore_on_error(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Iterator[None]:
    """Within the block, a raise restores ``model`` (and ``optimizer``) as they were (module docstring)."""
    snapshot = ModelSnapshot(model, optimizer)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


def restores_on_error(fn):
    """Decorator for a model-level function whose first argument is the model: a call that raises
    leaves the model as it was (``restore_on_error``). Arguments that are not a module pass through
    to ``fn``, whose own checks report them."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)
        with restore_on_error(model):
            return fn(model, *args, **kwargs)
    return wrapper
