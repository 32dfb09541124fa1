"""``stack(models)`` and ``unstack(stacked)``: K models of one architecture <-> one stacked model."""
import copy
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from sparse_engine.nn.sparse_attention import SparseMultiheadAttention
from sparse_engine.nn.sparsify import _guard_transformer_fast_paths, _unguard_transformer_fast_paths, sparse_modules
from sparse_engine.nn.sparse_bilinear import SparseBilinear
from sparse_engine.nn.sparse_conv import SparseConv1d, SparseConv3d, _SparseConvTranspose
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparse_embedding import SparseEmbedding
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.nn.sparse_recurrent import _SparseRNNBase
from sparse_engine.stack.attention import StackedMultiheadAttention
from sparse_engine.stack.layers import (PerSample, StackedBatchNorm, StackedBilinear, StackedConv1d, StackedConv2d,
                                        StackedConv3d, StackedConvTranspose1d, StackedConvTranspose2d,
                                        StackedConvTranspose3d, StackedEmbedding, StackedLayer, StackedLayerNorm,
                                        StackedLinear, StackedMaskedLayer, StackedVmap)
from sparse_engine.stack.recurrent import StackedGRU, StackedLSTM, StackedRNN

_SUPPORTED = ("Linear, Conv1d, Conv2d, Conv3d, ConvTranspose1d/2d/3d, Bilinear, Embedding, LSTM, GRU, RNN, "
              "MultiheadAttention (and their sparse versions), BatchNorm1d/2d/3d, LayerNorm, and any other layer "
              "with Parameters but no child modules and no buffers (run with torch.func.vmap)")


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
        """``(name, layer)`` of every stacked layer with per-model masks, in module order (a MultiheadAttention's
        ``out_proj`` included)."""
        return [(n, m) for n, m in self.module.named_modules() if isinstance(m, StackedMaskedLayer)]

    def masked_units(self) -> list[tuple[str, object]]:
        """``(name, unit)`` per masked Parameter: the layer itself where ``weight`` is its only masked
        Parameter, else a ``MaskedWeight`` handle per Parameter; the names ``sparse_modules`` gives the
        unstacked models' units."""
        return [u for n, m in self.masked_layers() for u in m.mask_units(n)]

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
    ref_units = [n for n, _ in sparse_modules(models[0])]
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
        if [n for n, _ in sparse_modules(m)] != ref_units:
            raise ValueError(f"models[{i}]: expected the sparse layers of models[0] (sparse_modules: the same masked "
                             f"weights), got {[n for n, _ in sparse_modules(m)]} against {ref_units}")
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
    # a stacked layer stacks the layers it holds (MultiheadAttention's out_proj): not visited on their own
    for name, module in _named_outer(models[0], lambda m: id(m) in memo):
        cls = stacked_type(module)
        if cls is not None:
            memo[id(module)] = cls.from_modules([m.get_submodule(name) for m in models])
        elif not module._modules:
            memo[id(module)] = PerSample(copy.deepcopy(module))
    with torch.no_grad():
        stacked = StackedModel(copy.deepcopy(models[0], memo), len(models))
    stacked.training = models[0].training
    # torch's fused transformer inference path would read the stacked weights as one model's
    _guard_transformer_fast_paths(stacked.module, always=True)
    return stacked


def _named_outer(module: nn.Module, holds: Callable[[nn.Module], bool]):
    """``module.named_modules()`` without the descendants of the modules for which ``holds`` is true (asked
    after the caller has handled the module)."""
    inner = set()
    for name, m in module.named_modules():
        if id(m) in inner:
            continue
        yield name, m
        if holds(m):
            inner.update(id(c) for c in m.modules() if c is not m)


def stacked_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the stacked layers (and ``PerSample`` wrappers) of a stacked module tree, not those
    held inside another stacked layer (which the holder unstacks)."""
    is_stacked = lambda m: isinstance(m, (StackedLayer, PerSample))  # noqa: E731
    return [(n, m) for n, m in _named_outer(module, is_stacked) if is_stacked(m)]


def unstack(stacked: StackedModel) -> list[nn.Module]:
    """The K models of ``stacked`` as ordinary sparse models (weights, masks, buffers: fresh tensors, bit-identical
    to the stack's). Each layer is masked where the model's was (dense weights stay dense), and also where its
    mask was set in the stack to prune something."""
    if not isinstance(stacked, StackedModel):
        raise TypeError(f"stacked: expected a StackedModel (from stack), got {type(stacked).__name__}")
    layers = [m for _, m in stacked_layers(stacked.module)]
    out = []
    with torch.no_grad():
        for i in range(stacked.num_models):
            model = copy.deepcopy(stacked.module, {id(m): m.unstacked(i) for m in layers})
            model.train(stacked.training)
            _unguard_transformer_fast_paths(model)  # guarded as sparsify guards it, no more
            _guard_transformer_fast_paths(model)
            out.append(model)
    return out


def stacked_type(module: nn.Module) -> Optional[type]:
    """The stacked class for a layer, or None when it has no stacked version."""
    # A subclass that overrides forward may compute something else with its weight: not stacked.
    if isinstance(module, nn.Linear) and type(module).forward in (nn.Linear.forward, SparseLinear.forward):
        return StackedLinear
    if isinstance(module, nn.Conv2d) and type(module).forward in (nn.Conv2d.forward, SparseConv2d.forward):
        return StackedConv2d
    if isinstance(module, nn.Conv1d) and type(module).forward in (nn.Conv1d.forward, SparseConv1d.forward):
        return StackedConv1d
    if isinstance(module, nn.Embedding) and type(module).forward in (nn.Embedding.forward, SparseEmbedding.forward):
        return StackedEmbedding
    if isinstance(module, nn.Conv3d) and type(module).forward in (nn.Conv3d.forward, SparseConv3d.forward):
        return StackedConv3d
    for dense, stacked in ((nn.ConvTranspose1d, StackedConvTranspose1d), (nn.ConvTranspose2d, StackedConvTranspose2d),
                           (nn.ConvTranspose3d, StackedConvTranspose3d)):
        if isinstance(module, dense) and type(module).forward in (dense.forward, _SparseConvTranspose.forward):
            return stacked
    if isinstance(module, nn.Bilinear) and type(module).forward in (nn.Bilinear.forward, SparseBilinear.forward):
        return StackedBilinear
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, nn.SyncBatchNorm):
        return StackedBatchNorm
    if type(module) is nn.LayerNorm:
        return StackedLayerNorm
    for dense, stacked in ((nn.LSTM, StackedLSTM), (nn.GRU, StackedGRU), (nn.RNN, StackedRNN)):
        if isinstance(module, dense) and type(module).forward in (dense.forward, _SparseRNNBase.forward):
            return stacked
    if isinstance(module, nn.MultiheadAttention) and type(module).forward in (
            nn.MultiheadAttention.forward, SparseMultiheadAttention.forward):
        return StackedMultiheadAttention
    if StackedVmap.applies_to(module):
        return StackedVmap
    return None

