"""Stacked layers: one module holding the same layer of S models, computing all S on ``(S, B, ...)`` inputs.

Every stacked layer keeps each Parameter and buffer of the S models as one tensor with a leading
model axis (``weight (S, *shape)``), built by ``from_modules`` from S ordinary layers and given
back by ``unstacked(i)`` as an ordinary sparse layer, bit-identical. Masked layers hold one
bit-packed mask per model (``mask_bits (S, rows, words)``, ``sparse_engine.ops.stacked_mask``), so
every model keeps its own sparsity pattern: Linear, Conv1d and Conv2d compute through the stacked
masked ops; Conv3d and ConvTranspose run one grouped torch convolution and Bilinear one ``einsum`` on
the models' masked weights (``masked_weight_for_op``: exact-zero gradients at pruned entries).
"""
import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.conversion import convert_module
from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparse_conv2d import SparseConv2d, explicit_padding
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.nn.sparse_bilinear import SparseBilinear
from sparse_engine.nn.sparse_conv import SparseConv1d, SparseConv3d, _SparseConvTranspose
from sparse_engine.nn.sparse_embedding import SparseEmbedding
from sparse_engine.ops.masked_weight import masked_weight_for_op
from sparse_engine.ops.stacked_mask import (apply_stacked_mask, pack_stacked_mask, stacked_packed_shape,
                                            unpack_stacked_mask)
from sparse_engine.ops.stacked_masked_conv2d import stacked_masked_conv2d
from sparse_engine.ops.stacked_masked_linear import stacked_masked_linear


def _prototype(module: nn.Module) -> nn.Module:
    """A weightless copy of ``module`` (on the meta device): the recipe ``unstacked`` rebuilds a layer from."""
    return copy.deepcopy(module).to("meta")


class StackedLayer(nn.Module):
    """Base of the stacked layers: ``num_models``, the prototype, and stacking of Parameters and buffers."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.num_models = len(modules)
        self.training = modules[0].training
        self.__dict__["_prototype"] = _prototype(modules[0])
        first = modules[0]
        for name, p in first._parameters.items():
            self.register_parameter(name, None if p is None else nn.Parameter(
                torch.stack([getattr(m, name).detach() for m in modules]), requires_grad=p.requires_grad))
        for name, b in first._buffers.items():
            if name not in first._non_persistent_buffers_set:
                self.register_buffer(name, None if b is None else torch.stack([getattr(m, name) for m in modules]))

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module]) -> "StackedLayer":
        reason = cls.unsupported(modules[0])
        if reason is not None:
            raise ValueError(f"modules: {reason}")
        return cls(modules)

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        """Why ``module``'s options have no stacked version (None: they do)."""
        return None

    @torch.no_grad()
    def unstacked(self, i: int) -> nn.Module:
        """Model ``i``'s layer as an ordinary (sparse where masked) layer: fresh tensors, bit-identical values."""
        if not 0 <= i < self.num_models:
            raise IndexError(f"i: expected a model index in [0, {self.num_models}), got {i}")
        tensors = list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False))
        layer = copy.deepcopy(self._prototype).to_empty(device=tensors[0][1].device)
        for name, t in tensors:
            if name != "mask_bits":
                getattr(layer, name).copy_(t[i])
        return layer

    @torch.no_grad()
    def load_slice_(self, i: int, module: nn.Module) -> None:
        """Write ``module`` (an ordinary layer of model ``i``'s architecture, as ``unstacked(i)`` gives) into
        model ``i``'s slices: the inverse of ``unstacked``."""
        if not 0 <= i < self.num_models:
            raise IndexError(f"i: expected a model index in [0, {self.num_models}), got {i}")
        for name, t in list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False)):
            if name != "mask_bits":
                src = getattr(module, name, None)
                if not isinstance(src, Tensor) or src.shape != t.shape[1:]:
                    raise ValueError(f"module: expected {name!r} of shape {tuple(t.shape[1:])}, got "
                                     f"{getattr(src, 'shape', type(src).__name__)}")
                t[i].copy_(src)


class StackedMaskedLayer(StackedLayer):
    """A stacked layer whose ``weight`` carries one bit-packed mask per model (the buffer ``mask_bits``)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        masks = [m.mask if isinstance(m, MaskedModule) else torch.ones_like(m.weight, dtype=torch.bool)
                 for m in modules]
        self.backend = modules[0].backend if isinstance(modules[0], MaskedModule) else "triton"
        self.register_buffer("mask_bits", torch.empty(stacked_packed_shape(self.weight.shape), dtype=torch.int32,
                                                      device=self.weight.device))
        self.mask_version = 0
        self.set_mask(torch.stack(masks))

    @property
    def mask(self) -> Tensor:
        """The masks of all models, bool ``(S, *weight_shape)`` (True = kept). A fresh tensor."""
        return unpack_stacked_mask(self.mask_bits, self.weight.shape)

    @torch.no_grad()
    def set_mask(self, mask: Tensor) -> None:
        """Set every model's mask (bool, the stacked weight's shape) and zero the pruned weights."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool torch.Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask: expected shape {tuple(self.weight.shape)} (the stacked weight's), "
                             f"got {tuple(mask.shape)}")
        self.mask_bits.copy_(pack_stacked_mask(mask.to(self.weight.device)))
        self.weight.masked_fill_(~mask.to(self.weight.device), 0)
        self.mask_version += 1  # tells the optimizer masking to clear the state of newly pruned entries

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero every model's weights at its pruned positions."""
        self.weight.masked_fill_(~self.mask, 0)

    @torch.no_grad()
    def unstacked(self, i: int) -> MaskedModule:
        layer = super().unstacked(i)
        if not isinstance(layer, MaskedModule):
            convert_module(layer, self.backend)
        layer.set_mask(self.mask[i])
        return layer

    @torch.no_grad()
    def load_slice_(self, i: int, module: nn.Module) -> None:
        super().load_slice_(i, module)
        mask = module.mask if isinstance(module, MaskedModule) else torch.ones_like(module.weight, dtype=torch.bool)
        self.mask_bits[i].copy_(pack_stacked_mask(mask[None].to(self.weight.device))[0])
        self.weight[i].masked_fill_(~mask.to(self.weight.device), 0)
        self.mask_version += 1


class StackedLinear(StackedMaskedLayer):
    """S masked ``nn.Linear`` layers: ``weight (S, out, in)``, ``bias (S, out)``; input ``(S, ..., in)``."""

    def forward(self, x: Tensor) -> Tensor:
        return stacked_masked_linear(x, self.weight, self.mask_bits, self.bias)

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, in_features={self.weight.shape[2]}, out_features={self.weight.shape[1]}"


class StackedConv2d(StackedMaskedLayer):
    """S masked ``nn.Conv2d`` layers (all of ``nn.Conv2d``'s options): ``weight (S, Co, C/g, kH, kW)``;
    input ``(S, B, C, H, W)``."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        conv = modules[0]
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size",
                     "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5:
            raise ValueError(f"x: expected shape (num_models, B, C, H, W), got {tuple(x.shape)}")
        s, b = x.shape[:2]
        flat, padding = explicit_padding(self, x.flatten(0, 1))
        x = flat.unflatten(0, (s, b))
        return stacked_masked_conv2d(x, self.weight, self.mask_bits, self.bias, self.stride, padding, self.dilation,
                                     self.groups)

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, {self.weight.shape[2] * self.groups}, {self.weight.shape[1]}, "
                f"kernel_size={tuple(self.kernel_size)}, stride={self.stride}, padding={self.padding}")


class StackedConv1d(StackedConv2d):
    """S masked ``nn.Conv1d`` layers: ``weight (S, Co, C/g, k)``; input ``(S, B, C, L)``. Runs the stacked
    conv2d on height-1 views (a ``(Co, C/g, k)`` weight and its ``(Co, C/g, 1, k)`` view share a packed mask)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"x: expected shape (num_models, B, C, L), got {tuple(x.shape)}")
        s, b = x.shape[:2]
        flat, padding = explicit_padding(self, x.flatten(0, 1))
        y = stacked_masked_conv2d(flat.unflatten(0, (s, b)).unsqueeze(-2), self.weight.unsqueeze(-2), self.mask_bits,
                                  self.bias, (1, self.stride[0]), (0, padding[0]), (1, self.dilation[0]), self.groups)
        return y.squeeze(-2)


def _stacked_masked_weight(layer: StackedMaskedLayer) -> Tensor:
    """``W*M`` of every model, ``(S * rows, ...)``: model s's rows are rows ``s * rows + r`` (the packed layout
    of ``stacked_mask``), differentiable with exact-zero gradients at pruned entries. For the stacked layers
    that run one grouped torch op on it (Conv3d, ConvTranspose, Bilinear), which reads it and keeps no alias."""
    return masked_weight_for_op(layer.weight.flatten(0, 1), layer.mask_bits.flatten(0, 1))


class _StackedGroupedConv(StackedMaskedLayer):
    """S masked convolutions as one convolution with ``groups * S`` groups: the models' channels side by
    side, ``(S, B, C, ...) -> (B, S*C, ...)``, each model's weight its own groups. Input ``(S, B, C, *spatial)``."""

    _spatial_dims = 0

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        conv = modules[0]
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size", "output_padding",
                     "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(conv, attr))

    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        s = self.num_models
        if x.dim() != self._spatial_dims + 3 or x.shape[0] != s:
            raise ValueError(f"x: expected shape ({s}, B, C) and {self._spatial_dims} spatial dimension(s), "
                             f"with the model axis first, got {tuple(x.shape)}")
        side = x.transpose(0, 1).flatten(1, 2)  # (B, S*C, ...)
        y = self._conv(side, _stacked_masked_weight(self), None if self.bias is None else self.bias.flatten(),
                       self.groups * s)
        return y.unflatten(1, (s, -1)).transpose(0, 1)  # (S, B, Co, ...), a view of (B, S, Co, ...)

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, kernel_size={tuple(self.kernel_size)}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")


class StackedConv3d(_StackedGroupedConv):
    """S masked ``nn.Conv3d`` layers (every padding mode): ``weight (S, Co, C/g, kD, kH, kW)``; input
    ``(S, B, C, D, H, W)``."""

    _spatial_dims = 3

    def _conv(self, x, weight, bias, groups):
        x, padding = explicit_padding(self, x)
        return F.conv3d(x, weight, bias, self.stride, padding, self.dilation, groups)


class _StackedConvTranspose(_StackedGroupedConv):
    """S masked ``nn.ConvTransposeNd`` layers: ``weight (S, C, Co/g, *k)``; ``output_padding`` as set on the
    layers (the ``output_size`` argument of their forward has no stacked version)."""

    _functional = None

    def _conv(self, x, weight, bias, groups):
        return type(self)._functional(x, weight, bias, self.stride, self.padding, self.output_padding, groups,
                                      self.dilation)


class StackedConvTranspose1d(_StackedConvTranspose):
    _spatial_dims, _functional = 1, F.conv_transpose1d


class StackedConvTranspose2d(_StackedConvTranspose):
    _spatial_dims, _functional = 2, F.conv_transpose2d


class StackedConvTranspose3d(_StackedConvTranspose):
    _spatial_dims, _functional = 3, F.conv_transpose3d


class StackedBilinear(StackedMaskedLayer):
    """S masked ``nn.Bilinear`` layers: ``weight (S, out, in1, in2)``; inputs ``(S, ..., in1)`` and
    ``(S, ..., in2)``: ``y[s] = x1[s] W[s] x2[s] + b[s]``, one ``einsum`` for all models."""

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        s, out, in1, in2 = self.weight.shape
        if x1.dim() < 2 or x1.shape[0] != s or x1.shape[-1] != in1:
            raise ValueError(f"x1: expected shape ({s}, ..., {in1}), got {tuple(x1.shape)}")
        if x2.shape[:-1] != x1.shape[:-1] or x2.shape[-1] != in2:
            raise ValueError(f"x2: expected shape {tuple(x1.shape[:-1]) + (in2,)}, got {tuple(x2.shape)}")
        weight = _stacked_masked_weight(self).view(s, out, in1, in2)
        y = torch.einsum("sbi,soij,sbj->sbo", x1.reshape(s, -1, in1), weight, x2.reshape(s, -1, in2))
        if self.bias is not None:
            y = y + self.bias.unsqueeze(1)
        return y.reshape(*x1.shape[:-1], out)

    def extra_repr(self) -> str:
        s, out, in1, in2 = self.weight.shape
        return f"num_models={s}, in1_features={in1}, in2_features={in2}, out_features={out}"


class StackedEmbedding(StackedMaskedLayer):
    """S masked ``nn.Embedding`` tables: ``weight (S, V, D)``; indices ``(S, ...)``, model s looking up in table
    s. One lookup in the ``(S*V, D)`` masked tables (indices offset by ``s*V``); the gradient is exactly zero at
    pruned entries and at ``padding_idx`` rows, and ``scale_grad_by_freq`` counts per model (the offset indices
    differ between models). ``max_norm`` (renormalises rows in place) and ``sparse=True`` have no stacked version."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        emb = modules[0]
        self.padding_idx, self.scale_grad_by_freq = emb.padding_idx, emb.scale_grad_by_freq

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        if module.max_norm is not None or module.sparse:
            return "stacking Embedding with max_norm or sparse=True is not supported"
        return None

    def forward(self, indices: Tensor) -> Tensor:
        s, v = self.weight.shape[:2]
        if indices.dim() < 1 or indices.shape[0] != s:
            raise ValueError(f"indices: expected shape ({s}, ...) with the model axis first, got "
                             f"{tuple(indices.shape)}")
        table = apply_stacked_mask(self.weight, self.mask_bits).view(s * v, -1)
        offset = (torch.arange(s, device=indices.device) * v).view(s, *([1] * (indices.dim() - 1)))
        out = F.embedding(indices + offset, table, None, None, 2.0, self.scale_grad_by_freq)
        if self.padding_idx is not None:  # no gradient into the padding rows, as nn.Embedding
            out = torch.where((indices == self.padding_idx).unsqueeze(-1), out.detach(), out)
        return out

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, {self.weight.shape[1]}, {self.weight.shape[2]}"


class StackedBatchNorm(StackedLayer):
    """S ``nn.BatchNorm1d/2d/3d`` layers with per-model affine parameters and running statistics.

    The S models' channels are laid side by side (``(B, S*C, ...)``) and normalised by one
    ``F.batch_norm`` call: each channel's statistics come from its own model's batch only, and each
    model's running statistics are updated in place in its slice of ``running_mean (S, C)``.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        bn = modules[0]
        self.eps, self.momentum = bn.eps, bn.momentum
        self.track_running_stats = bn.track_running_stats

    @classmethod
    def unsupported(cls, module: nn.Module) -> Optional[str]:
        if module.track_running_stats and module.momentum is None:
            return "stacking BatchNorm with momentum=None (cumulative averages) is not supported; use a float momentum"
        return None

    def forward(self, x: Tensor) -> Tensor:
        s = self.num_models
        if x.dim() < 3 or x.shape[0] != s:
            raise ValueError(f"x: expected shape ({s}, B, C, ...), got {tuple(x.shape)}")
        b, c = x.shape[1], x.shape[2]
        side = x.transpose(0, 1).reshape(b, s * c, *x.shape[3:])
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or not self.track_running_stats
        flat = lambda t: None if t is None else t.view(-1)
        tracked = self.track_running_stats
        y = F.batch_norm(side, flat(self.running_mean) if tracked else None,
                         flat(self.running_var) if tracked else None,
                         flat(self.weight), flat(self.bias), use_batch, self.momentum or 0.0, self.eps)
        return y.reshape(b, s, c, *x.shape[3:]).transpose(0, 1)


class StackedLayerNorm(StackedLayer):
    """S ``nn.LayerNorm`` layers: per-model ``weight``/``bias (S, *normalized_shape)``."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        ln = modules[0]
        self.normalized_shape, self.eps = tuple(ln.normalized_shape), ln.eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        view = (self.num_models,) + (1,) * (x.dim() - 1 - len(self.normalized_shape)) + self.normalized_shape
        if self.weight is not None:
            y = y * self.weight.view(view)
        if self.bias is not None:
            y = y + self.bias.view(view)
        return y


class PerSample(nn.Module):
    """A layer without parameters (activation, pooling, flatten, dropout, ...) applied to ``(S, B, ...)``
    inputs by folding the model axis into the batch: ``module(x.flatten(0, 1)).unflatten(0, (S, B))``.

    Correct for every layer that treats dimension 0 as the batch; dropout draws independent masks
    for every element, so independent ones per model.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"x: expected shape (num_models, B, ...), got {tuple(x.shape)}")
        lead = x.shape[:2]
        if not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
            # (S, B, ...) as a view of a (B, S, ...) tensor (the stacked convolution's and BatchNorm's
            # output): fold (B, S) instead, without a copy; the order of the samples does not matter.
            return self.module(x.transpose(0, 1).flatten(0, 1)).unflatten(0, lead[::-1]).transpose(0, 1)
        return self.module(x.flatten(0, 1)).unflatten(0, lead)

    def unstacked(self, i: int) -> nn.Module:
        return copy.deepcopy(self.module)


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
    return None

