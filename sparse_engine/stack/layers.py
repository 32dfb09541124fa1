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
from sparse_engine.nn.masked_module import MaskedModule, MaskedWeight, mask_buffer_name
from sparse_engine.nn.sparse_conv2d import explicit_padding
from sparse_engine.ops.stacked_mask import (apply_stacked_mask, pack_stacked_mask, stacked_masked_weight_for_op,
                                            stacked_packed_shape, unpack_stacked_mask)
from sparse_engine.ops.stacked_masked_conv2d import stacked_masked_conv2d
from sparse_engine.ops.stacked_masked_linear import stacked_masked_linear


def _prototype(module: nn.Module) -> nn.Module:
    """A weightless copy of ``module`` (on the meta device): the recipe ``unstacked`` rebuilds a layer from."""
    return copy.deepcopy(module).to("meta")


class StackedLayer(nn.Module):
    """Base of the stacked layers: ``num_models``, the prototype, and stacking of Parameters and buffers.

    A stacked layer may hold stacked layers of its children (MultiheadAttention's ``out_proj``):
    ``unstacked`` and ``load_slice_`` recurse into them."""

    _skipped_buffers: frozenset = frozenset()  # buffers that are not the models' (the stacked masks)

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

    def models_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, stacked tensor)`` of this layer's own Parameters and buffers that hold the models' values
        (model i's at ``[i]``); not the stacked masks, not the children's."""
        return [(n, t) for n, t in list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False))
                if n not in self._skipped_buffers]

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.num_models:
            raise IndexError(f"i: expected a model index in [0, {self.num_models}), got {i}")

    @torch.no_grad()
    def unstacked(self, i: int) -> nn.Module:
        """Model ``i``'s layer as an ordinary (sparse where masked) layer: fresh tensors, bit-identical values."""
        self._check_index(i)
        tensors = self.models_tensors()
        device = (tensors[0][1] if tensors else next(self.parameters())).device
        layer = copy.deepcopy(self._prototype).to_empty(device=device)
        for name, t in tensors:
            getattr(layer, name).copy_(t[i])
        for name, child in self._modules.items():
            setattr(layer, name, child.unstacked(i))
        return layer

    @torch.no_grad()
    def load_slice_(self, i: int, module: nn.Module) -> None:
        """Write ``module`` (an ordinary layer of model ``i``'s architecture, as ``unstacked(i)`` gives) into
        model ``i``'s slices: the inverse of ``unstacked``."""
        self._check_index(i)
        for name, t in self.models_tensors():
            src = getattr(module, name, None)
            if not isinstance(src, Tensor) or src.shape != t.shape[1:]:
                raise ValueError(f"module: expected {name!r} of shape {tuple(t.shape[1:])}, got "
                                 f"{getattr(src, 'shape', type(src).__name__)}")
            t[i].copy_(src)
        for name, child in self._modules.items():
            child.load_slice_(i, getattr(module, name))


class StackedMaskedLayer(StackedLayer):
    """A stacked layer whose masked weights carry one bit-packed mask per model: ``weight`` and its buffer
    ``mask_bits`` (Linear, Conv, ...), or several (``masked_weight_names``: LSTM's ``weight_ih_l0``, ...,
    with buffers ``<name>_mask_bits``, as in the sparse layers; ``MaskedWeight`` handles are their units)."""

    # The parent computes with this layer's weight without calling its forward (MultiheadAttention's
    # out_proj): the sparse layers it unstacks to are converted as such (``convert_module``).
    called_by_parent = False

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__(modules)
        first = modules[0]
        self.backend = first.backend if isinstance(first, MaskedModule) else "triton"
        self._masked_names = self.masked_weight_names(first)
        # the Parameters masked in the models themselves (a dense layer's: none; sparsify(exclude=...) may leave
        # some of a layer's dense): the pruning units of the models' views, and what unstacked layers mask
        self.pruned_names = tuple(first._masked_names) if isinstance(first, MaskedModule) else ()
        self._skipped_buffers = frozenset(mask_buffer_name(n) for n in self._masked_names)
        self._mask_versions = {}
        for n in self._masked_names:
            masks = [m.mask_of(n) if isinstance(m, MaskedModule) and n in m._masked_names
                     else torch.ones_like(getattr(m, n), dtype=torch.bool) for m in modules]
            w = getattr(self, n)
            self.register_buffer(mask_buffer_name(n), torch.empty(stacked_packed_shape(w.shape), dtype=torch.int32,
                                                                  device=w.device))
            self._mask_versions[n] = 0
            self.set_mask(torch.stack(masks), n)

    @classmethod
    def masked_weight_names(cls, module: nn.Module) -> tuple[str, ...]:
        """The Parameters of ``module`` (a layer of the stacked type) that carry masks."""
        return ("weight",)

    def mask_bits_of(self, name: str = "weight") -> Tensor:
        if name not in self._masked_names:
            raise ValueError(f"name: {name!r} is not a masked weight of {type(self).__name__}; its masked weights "
                             f"are {list(self._masked_names)}")
        return self._buffers[mask_buffer_name(name)]

    def mask_of(self, name: str = "weight") -> Tensor:
        """The masks of all models for Parameter ``name``, bool ``(S, *its shape[1:])``. A fresh tensor."""
        return unpack_stacked_mask(self.mask_bits_of(name), getattr(self, name).shape)

    @property
    def mask(self) -> Tensor:
        """The masks of all models, bool ``(S, *weight_shape)`` (True = kept). A fresh tensor."""
        return self.mask_of("weight")

    @property
    def mask_version(self) -> int:
        """Increases whenever ``set_mask`` changes the mask of ``weight`` (the optimizer masking reads it)."""
        return self._mask_versions["weight"]

    def bump_mask_versions(self) -> None:
        """Tell the optimizer masking that masks changed (views of the stack wrote them: ``stack.pruning``)."""
        for n in self._mask_versions:
            self._mask_versions[n] += 1

    def mask_version_of(self, name: str = "weight") -> int:
        self.mask_bits_of(name)  # checks the name
        return self._mask_versions[name]

    def mask_units(self, prefix: str) -> list[tuple[str, object]]:
        """``(name, unit)`` per masked Parameter, named as ``sparse_modules`` names the sparse layer's units: the
        layer itself for ``weight`` alone, else a ``MaskedWeight`` handle (the stacked layer has the methods it
        calls) per Parameter."""
        if self._masked_names == ("weight",):
            return [(prefix, self)]
        return [(f"{prefix}.{n}" if prefix else n, MaskedWeight(self, n)) for n in self._masked_names]

    @torch.no_grad()
    def set_mask(self, mask: Tensor, name: str = "weight") -> None:
        """Set every model's mask of Parameter ``name`` (bool, the stacked weight's shape) and zero the pruned
        weights."""
        bits = self.mask_bits_of(name)
        w = getattr(self, name)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool torch.Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != w.shape:
            raise ValueError(f"mask: expected shape {tuple(w.shape)} (the stacked {name}'s), got {tuple(mask.shape)}")
        bits.copy_(pack_stacked_mask(mask.to(w.device)))
        w.masked_fill_(~mask.to(w.device), 0)
        self._mask_versions[name] += 1  # tells the optimizer masking to clear the state of newly pruned entries

    @torch.no_grad()
    def apply_mask_(self, name: Optional[str] = None) -> None:
        """Zero every model's weights at its pruned positions (all masked weights, or Parameter ``name``)."""
        for n in self._masked_names if name is None else (name,):
            getattr(self, n).masked_fill_(~self.mask_of(n), 0)

    def _masked_weight(self, name: str = "weight", weight: Optional[Tensor] = None) -> Tensor:
        """``W*M`` of every model for Parameter ``name`` (or for ``weight``, a tensor of its shape), shaped as the
        stacked weight, for a torch op that reads it and keeps no alias (``masked_weight_for_op``: exact-zero
        gradients at pruned entries)."""
        return stacked_masked_weight_for_op(getattr(self, name) if weight is None else weight, self.mask_bits_of(name))

    def as_sparse(self, layer: nn.Module, names: tuple) -> nn.Module:
        """``layer`` (a copy of the prototype) with masks on exactly the Parameters ``names`` (dense if none)."""
        if not names:
            return layer
        if not isinstance(layer, MaskedModule):
            convert_module(layer, self.backend, called_by_parent=self.called_by_parent)
        if tuple(layer._masked_names) != tuple(names):
            for n in layer._masked_names:
                del layer._buffers[mask_buffer_name(n)]
            layer._init_masks(self.backend, names=names)
        return layer

    @torch.no_grad()
    def unstacked(self, i: int) -> nn.Module:
        """Model ``i``'s layer, masked where the model's layer was, and wherever the stack's mask for it prunes
        something (so a dense layer comes back dense unless its mask was set in the stack)."""
        layer = super().unstacked(i)
        masks = {n: self.mask_of(n)[i] for n in self._masked_names}
        names = tuple(n for n in self._masked_names if n in self.pruned_names or not masks[n].all())
        layer = self.as_sparse(layer, names)
        for n in names:
            layer.set_mask(masks[n], n)
        return layer

    @torch.no_grad()
    def load_slice_(self, i: int, module: nn.Module) -> None:
        super().load_slice_(i, module)
        for n in self._masked_names:
            w = getattr(self, n)
            mask = (module.mask_of(n) if isinstance(module, MaskedModule) and n in module._masked_names
                    else torch.ones_like(getattr(module, n), dtype=torch.bool))
            self.mask_bits_of(n)[i].copy_(pack_stacked_mask(mask[None].to(w.device))[0])
            w[i].masked_fill_(~mask.to(w.device), 0)
            self._mask_versions[n] += 1


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
        y = self._conv(side, self._masked_weight().flatten(0, 1), None if self.bias is None else self.bias.flatten(),
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
        weight = self._masked_weight()
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


class StackedVmap(StackedLayer):
    """S copies of a layer with Parameters that has no stacked version of its own (``nn.PReLU``,
    ``nn.GroupNorm``, a user's layer with its own Parameters and ``forward``): its ``forward``, run once per
    model by ``torch.func.vmap`` over the model axis with model s's Parameters (``functional_call``).

    For leaf layers (no child modules) without buffers (whose in-place updates vmap cannot make per model),
    and not masked (a masked layer needs its stacked masked version). Every tensor argument carries the model
    axis first (``(S, ...)``); other arguments are passed as they are; random ops draw independently per model
    (``randomness="different"``). The Parameters are not masked (they are not pruning units, as in the layer
    alone).
    """

    @classmethod
    def applies_to(cls, module: nn.Module) -> bool:
        return (not module._modules and not isinstance(module, MaskedModule)
                and all(b is None for b in module._buffers.values())
                and any(p is not None for p in module._parameters.values()))

    def train(self, mode: bool = True) -> "StackedVmap":
        super().train(mode)
        self._prototype.train(mode)  # the module whose forward runs (not a child: its Parameters are ours)
        return self

    def forward(self, *args, **kwargs):
        s = self.num_models
        leaves, spec = torch.utils._pytree.tree_flatten((args, kwargs))
        for i, t in enumerate(leaves):
            if isinstance(t, Tensor) and (t.dim() == 0 or t.shape[0] != s):
                raise ValueError(f"{type(self._prototype).__name__} (stacked with vmap): expected every tensor "
                                 f"argument with the model axis ({s}) first, got shape {tuple(t.shape)}")
        params = {n: p for n, p in self._parameters.items() if p is not None}

        def one_model(p, *xs):
            a, kw = torch.utils._pytree.tree_unflatten(list(xs), spec)
            return torch.func.functional_call(self._prototype, p, a, kw)

        in_dims = (0,) + tuple(0 if isinstance(t, Tensor) else None for t in leaves)
        return torch.func.vmap(one_model, in_dims=in_dims, randomness="different")(params, *leaves)

    def extra_repr(self) -> str:
        return f"num_models={self.num_models}, {self._prototype!r} (vmap)"


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
