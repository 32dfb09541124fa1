"""``stack(models)`` and ``unstack(stacked)``: K models of one architecture <-> one stacked model."""
import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from sparse_engine.stack.layers import PerSample, StackedLayer, StackedMaskedLayer, stacked_type

_SUPPORTED = ("Linear, Conv1d, Conv2d, Conv3d, ConvTranspose1d/2d/3d, Bilinear, Embedding (and their sparse "
              "versions), BatchNorm1d/2d/3d, LayerNorm")


class StackedModel(nn.Module):
    """K models trained as one: ``forward`` takes ``(K, B, ...)`` and returns ``(K, B, ...)``.

    ``module`` is model 0's module tree with every layer replaced by its stacked version
    (``sparse_engine.stack.layers``); the containers (``nn.Sequential``, a user's ResNet block)
    are copies of model 0's and run their own ``forward`` on the stacked tensors.
    """

    def __init__(self, module: nn.Module, num_models: int):
        super().__init__()
        self.module = module
        self.num_models = num_models

    def forward(self, x: Tensor, *args, broadcast: bool = False, **kwargs):
        """``x``: ``(K, B, ...)``, model k's batch in ``x[k]``; or, with ``broadcast=True``, one batch
        ``(B, ...)`` that every model sees (an expanded view: no copy)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if broadcast:
            x = x.expand(self.num_models, *x.shape)
        elif x.dim() < 2 or x.shape[0] != self.num_models:
            raise ValueError(f"x: expected shape ({self.num_models}, B, ...) with the model axis first, got "
                             f"{tuple(x.shape)}; pass broadcast=True to give every model the same batch")
        return self.module(x, *args, **kwargs)

    def masked_layers(self) -> list[tuple[str, StackedMaskedLayer]]:
        """``(name, layer)`` of every stacked layer with per-model masks, in module order."""
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, StackedMaskedLayer)]

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}"


def _check_models(models) -> list[nn.Module]:
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError(f"models: expected a list of nn.Module, got {type(models).__name__}")
    models = list(models)
    if not models:
        raise ValueError("models: expected at least one model")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}]: expected an nn.Module, got {type(m).__name__}")
    ref_modules = [(n, type(m)) for n, m in models[0].named_modules()]
    ref_tensors = _tensors(models[0])
    for i, m in enumerate(models[1:], 1):
        if [(n, type(x)) for n, x in m.named_modules()] != ref_modules:
            raise ValueError(f"models[{i}]: expected the architecture of models[0] (same module names and types)")
        got = _tensors(m)
        if got != ref_tensors:
            diff = next(k for k in sorted(set(got) | set(ref_tensors)) if got.get(k) != ref_tensors.get(k))
            raise ValueError(f"models[{i}]: {diff!r} is {got.get(diff)} but {ref_tensors.get(diff)} in models[0]; "
                             "every model must have the same parameters and buffers (shape, dtype, device)")
        if m.training != models[0].training:
            raise ValueError(f"models[{i}]: expected the train/eval mode of models[0]")
    names = {}
    for n, p in models[0].named_parameters(remove_duplicate=False):
        if id(p) in names:
            raise ValueError(f"models: Parameter {n!r} is the same tensor as {names[id(p)]!r} (tied weights); "
                             "stacking tied weights is not supported")
        names[id(p)] = n
    return models


def _tensors(model: nn.Module) -> dict:
    out = {f"param {n}": (tuple(p.shape), p.dtype, p.device) for n, p in model.named_parameters()}
    out.update({f"buffer {n}": (tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers()})
    return out


def check_stackable(model: nn.Module, argument: str = "model") -> None:
    """Raise the error ``stack`` gives for ``model``'s architecture: a TypeError naming the first layer with
    Parameters or buffers that has no stacked version, a ValueError for a layer whose options have none
    (``StackedLayer.unsupported``: BatchNorm with ``momentum=None``, Embedding with ``max_norm``)."""
    for name, module in model.named_modules():
        cls = stacked_type(module)
        if cls is not None:
            reason = cls.unsupported(module)
            if reason is not None:
                raise ValueError(f"{argument}: layer {name!r}: {reason}")
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise TypeError(f"{argument}: layer {name or '(the model)'!r} of type {type(module).__name__} has no "
                            f"stacked version (supported layers with parameters: {_SUPPORTED})")


def stack(models: Sequence[nn.Module]) -> StackedModel:
    """One :class:`StackedModel` that trains ``models`` (K models of one architecture) at once.

    Each supported layer becomes a stacked layer holding all K models' Parameters, buffers and
    masks (dense layers get all-ones masks); layers without Parameters (activations, pooling,
    flatten, dropout, ...) apply to ``(K, B, ...)`` inputs with the model axis folded into the
    batch. The models are not changed; the stack holds copies. A layer with Parameters or buffers
    that has no stacked version is an error naming it.
    """
    models = _check_models(models)
    check_stackable(models[0], "models")
    memo = {}
    for name, module in models[0].named_modules():
        cls = stacked_type(module)
        if cls is not None:
            memo[id(module)] = cls.from_modules([m.get_submodule(name) for m in models])
        elif not module._modules:
            memo[id(module)] = PerSample(copy.deepcopy(module))
    with torch.no_grad():
        stacked = StackedModel(copy.deepcopy(models[0], memo), len(models))
    stacked.training = models[0].training
    return stacked


def unstack(stacked: StackedModel) -> list[nn.Module]:
    """The K models of ``stacked`` as ordinary sparse models (weights, masks, buffers: fresh tensors, bit-identical
    to the stack's). Dense layers of the stacked models come back as sparse layers with their masks."""
    if not isinstance(stacked, StackedModel):
        raise TypeError(f"stacked: expected a StackedModel (from stack), got {type(stacked).__name__}")
    layers = [m for m in stacked.module.modules() if isinstance(m, (StackedLayer, PerSample))]
    out = []
    with torch.no_grad():
        for i in range(stacked.num_models):
            model = copy.deepcopy(stacked.module, {id(m): m.unstacked(i) for m in layers})
            model.train(stacked.training)
            out.append(model)
    return out
