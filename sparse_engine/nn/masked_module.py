"""What every sparse layer shares: bit-packed masks over named weight Parameters.

**Design: one generic mechanism.** A sparse layer is its torch layer with its class swapped for
a subclass that mixes in :class:`MaskedModule`. The mixin masks any set of the module's weight
Parameters (``weight`` for Linear/Conv/Embedding/Bilinear; ``weight_ih_l0``, ``weight_hh_l0``,
... for LSTM/GRU/RNN; ``in_proj_weight`` or ``q/k/v_proj_weight`` for MultiheadAttention) and
owns everything that must not differ between layer types: mask storage, ``set_mask``, the
``state_dict`` contract (``mask_checkpoint``), tied weights, optimizer masking (through
``sparse_modules``), reporting and compile-friendliness. Per layer type there is only a
forward adapter of a few lines: the fused masked kernels where the layer is a matmul or
convolution the kernels cover (Linear, Conv2d, Conv1d, Bilinear, MultiheadAttention's
projections), the masked lookup for Embedding, and
elsewhere the layer's own torch functional on ``masked_weight(W, bits)`` (the masked dense
fallback, ``sparse_engine.ops.masked_weight``). We chose this over one hand-written class per
layer because the guarantees then hold by construction for every type, and over
``torch.nn.utils.parametrize`` because a parametrization renames the ``state_dict`` keys
(``parametrizations.weight.original``), which breaks strict loading into the dense model.

Guarantees, for every layer type (tested per type in ``tests/test_layer_types.py``):

* **Masks**: a non-persistent ``int32`` buffer per masked weight, 1 bit per weight along the
  flattened input dimension (``sparse_engine.ops.mask_pack``): ``mask_bits`` for ``weight``,
  ``<name>_mask_bits`` for the others. Not ``state_dict`` keys, so a sparse model's
  ``state_dict`` has exactly the dense architecture's keys.
* **Exact zeros**: ``set_mask`` zeroes the pruned weights; the **weight gradient is an exact
  zero at pruned positions** (masked kernels, or ``where(M, dW, 0)`` in the fallback). This is
  the invariant ``mask_optimizer`` relies on; a weight also used *outside* its layer's forward
  (``x @ layer.weight.T`` in user code) gets unmasked gradients from that use.
* **Checkpoints**: see ``mask_checkpoint`` (masks travel in ``_metadata``; ``state_dict()`` holds
  exact zeros at pruned positions; a checkpoint without masks derives them from exact zeros).

**Units.** ``sparse_modules(model)`` lists one unit per masked Parameter: the module itself when
its only masked weight is ``weight`` (``SparseLinear``, ``SparseConv2d``, ...), else a
:class:`MaskedWeight` handle per weight, named ``"<module>.<param>"``. Every unit has
``weight``, ``mask``, ``mask_bits``, ``set_mask``, ``apply_mask_``, ``mask_version`` and
``use_weight`` (the dense forward with a given weight, for scores that need dense gradients).

**Tied weights** (one Parameter in several layers, e.g. an embedding and the output
projection): the mask lives in the first layer holding the Parameter, in module order; the other
layers use that mask (``set_mask`` through any of them sets it for all), and ``sparse_modules``
lists the Parameter once, so pruning selection counts the shared weight once.
"""
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from sparse_engine.nn import mask_checkpoint
from sparse_engine.ops.mask_pack import apply_mask_, pack_mask, packed_shape, unpack_mask
from sparse_engine.ops.masked_linear import check_backend
from sparse_engine.ops.masked_weight import masked_weight, masked_weight_for_op


def mask_buffer_name(param_name: str) -> str:
    """The buffer holding the packed mask of the Parameter ``param_name``."""
    return "mask_bits" if param_name == "weight" else f"{param_name}_mask_bits"


class MaskedWeight:
    """One masked Parameter of a sparse layer that masks several (LSTM, MultiheadAttention, ...).

    The handle has the interface of a single-weight sparse layer (``weight``, ``mask``,
    ``mask_bits``, ``set_mask``, ``apply_mask_``, ``mask_version``, ``use_weight``); handles of the
    same (module, name) compare equal.
    """
    __slots__ = ("module", "name")

    def __init__(self, module: "MaskedModule", name: str):
        self.module = module
        self.name = name

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    @property
    def mask_bits(self) -> Tensor:
        return self.module.mask_bits_of(self.name)

    @property
    def mask(self) -> Tensor:
        return self.module.mask_of(self.name)

    @property
    def mask_version(self) -> int:
        return self.module.mask_version_of(self.name)

    @property
    def backend(self) -> str:
        return self.module.backend

    def set_mask(self, mask: Tensor) -> None:
        self.module.set_mask(mask, self.name)

    def apply_mask_(self) -> None:
        self.module.apply_mask_(self.name)

    def use_weight(self, weight: Tensor):
        return self.module.use_weights({self.name: weight})

    def __eq__(self, other) -> bool:
        return isinstance(other, MaskedWeight) and other.module is self.module and other.name == self.name

    def __hash__(self) -> int:
        return hash((id(self.module), self.name))

    def __repr__(self) -> str:
        return f"MaskedWeight({type(self.module).__name__}.{self.name}, shape={tuple(self.weight.shape)})"


class MaskedModule:
    """Mixin for a torch layer whose weight Parameters are masked by bit-packed masks.

    Sparse classes are ``class SparseX(MaskedModule, nn.X)``; ``dense_type`` is ``nn.X``.
    Constructing one directly takes ``nn.X``'s arguments plus ``backend``; ``sparsify`` converts
    existing layers in place instead (same Parameter objects).
    """

    dense_type: type = nn.Module
    # What the layer's forward receives, for scores that hook its input (Wanda, OBS): "linear"
    # (features last), "conv2d", or None when the input is not a plain activation matrix.
    input_kind: Optional[str] = None

    def __init__(self, *args, backend: str = "triton", **kwargs):
        check_backend(backend)
        super().__init__(*args, **kwargs)
        self._init_masks(backend)

    # ---- set-up ----------------------------------------------------------------------------

    def default_masked_weights(self) -> tuple[str, ...]:
        """Names of the Parameters this layer type masks."""
        return ("weight",)

    def _init_masks(self, backend: str = "triton", names: Optional[tuple[str, ...]] = None,
                    tied: Optional[dict] = None) -> None:
        """Register dense masks for ``names`` (default: ``default_masked_weights()``).

        ``tied`` maps a name to ``(module, name)`` of the layer that already masks the same
        Parameter; that layer's mask is used, none is registered here.
        """
        check_backend(backend)
        names = tuple(self.default_masked_weights() if names is None else names)
        tied = dict(tied or {})
        for n in names:
            p = getattr(self, n, None)
            if not isinstance(p, nn.Parameter) or p.dim() < 2:
                raise ValueError(f"{type(self).__name__}.{n}: expected a weight Parameter of rank >= 2 to mask")
        self.backend = backend
        self._masked_names = names
        self._mask_owners = tied
        self._mask_versions = {}
        self._weight_overrides = {}
        for n in names:
            if n not in tied:
                self._register_mask(n, torch.ones_like(getattr(self, n), dtype=torch.bool))

    def _init_mask(self, backend: str = "triton") -> None:  # the single-weight name of earlier versions
        self._init_masks(backend)

    def _register_mask(self, name: str, mask: Tensor) -> None:
        w = getattr(self, name)
        self.register_buffer(mask_buffer_name(name), torch.empty(packed_shape(w.shape), dtype=torch.int32,
                                                                 device=w.device), persistent=False)
        self._mask_versions[name] = 0
        self._mask_owners.pop(name, None)
        self.set_mask(mask, name)

    def _owner(self, name: str) -> tuple["MaskedModule", str]:
        """``(module, name)`` of the layer holding the mask of this layer's Parameter ``name``."""
        if name not in self._masked_names:
            raise ValueError(f"name: {name!r} is not a masked weight of {type(self).__name__}; its masked weights "
                             f"are {list(self._masked_names)}")
        owner = self._mask_owners.get(name)
        return (self, name) if owner is None else owner

    def owned_masked_weights(self) -> tuple[str, ...]:
        """Names of the masked Parameters whose mask this layer holds (not tied to an earlier layer)."""
        return tuple(n for n in self._masked_names if n not in self._mask_owners)

    # ---- masks -------------------------------------------------------------------------------

    def mask_bits_of(self, name: str = "weight") -> Tensor:
        module, n = self._owner(name)
        return module._buffers[mask_buffer_name(n)]

    def mask_of(self, name: str = "weight") -> Tensor:
        """The mask of Parameter ``name`` as a bool tensor of its shape (True = kept). A fresh tensor."""
        return unpack_mask(self.mask_bits_of(name), getattr(self, name).shape)

    def mask_version_of(self, name: str = "weight") -> int:
        module, n = self._owner(name)
        return module._mask_versions[n]

    def _single_weight(self, what: str) -> str:
        if "weight" not in self._masked_names:
            raise TypeError(f"{type(self).__name__} masks several weights {list(self._masked_names)}: use "
                            f"layer.masked_weights[name].{what} (or sparse_engine.sparse_modules(model))")
        return "weight"

    @property
    def mask(self) -> Tensor:
        """The mask of ``weight`` as a bool tensor of the weight's shape (True = kept). A fresh tensor."""
        return self.mask_of(self._single_weight("mask"))

    @property
    def mask_version(self) -> int:
        """Increases whenever ``set_mask`` changes the mask of ``weight`` (``mask_optimizer`` reads it)."""
        return self.mask_version_of(self._single_weight("mask_version"))

    @property
    def masked_weights(self) -> dict[str, MaskedWeight]:
        """``{name: MaskedWeight}`` for every masked Parameter of this layer."""
        return {n: MaskedWeight(self, n) for n in self._masked_names}

    def mask_units(self, prefix: str) -> list[tuple[str, object]]:
        """The ``(name, unit)`` pairs ``sparse_modules`` lists for this layer (module name ``prefix``)."""
        owned = self.owned_masked_weights()
        if self._masked_names == ("weight",):
            return [(prefix, self)] if owned else []
        return [(f"{prefix}.{n}" if prefix else n, MaskedWeight(self, n)) for n in owned]

    @torch.no_grad()
    def set_mask(self, mask: Tensor, name: str = "weight") -> None:
        """Set the mask of Parameter ``name`` (bool, its shape and device) and zero its pruned weights.

        The mask version increases, which tells ``mask_optimizer`` to clear the optimizer state of
        newly pruned entries. On a tied weight, sets the mask of every layer sharing it.
        """
        module, n = self._owner(name)
        if module is not self:
            return module.set_mask(mask, n)
        w = getattr(self, n)
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask: expected a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
        if mask.shape != w.shape:
            raise ValueError(f"mask: expected shape {tuple(w.shape)} (the weight's), got {tuple(mask.shape)}")
        if mask.device != w.device:
            raise ValueError(f"mask: expected a tensor on {w.device} (the weight's device), got {mask.device}")
        self._buffers[mask_buffer_name(n)].copy_(pack_mask(mask))
        w.masked_fill_(~mask, 0)
        self._mask_versions[n] += 1

    @torch.no_grad()
    def apply_mask_(self, name: Optional[str] = None) -> None:
        """Zero the weights at pruned positions (all masked weights, or Parameter ``name``)."""
        for n in self._masked_names if name is None else (name,):
            apply_mask_(getattr(self, n), self.mask_bits_of(n))

    # ---- forward -----------------------------------------------------------------------------

    def weight_override(self, name: str = "weight") -> Optional[Tensor]:
        """The tensor set by ``use_weights`` for Parameter ``name``, or None (the masked forward)."""
        module, n = self._owner(name)
        return module._weight_overrides.get(n)

    def effective_weight(self, name: str = "weight") -> Tensor:
        """What the forward multiplies by: the ``use_weights`` override, else ``W*M`` (a new tensor,
        differentiable, exact-zero gradient at pruned positions)."""
        override = self.weight_override(name)
        if override is not None:
            return override
        return masked_weight(getattr(self, name), self.mask_bits_of(name))

    def _forward_weight(self, name: str = "weight") -> Tensor:
        """For the layer's own torch op, which reads it and keeps no alias: :meth:`effective_weight`'s
        values, without the copy where ``masked_weight_for_op`` can skip it (the weight itself on the CPU
        when its pruned entries are zeros)."""
        override = self.weight_override(name)
        if override is not None:
            return override
        return masked_weight_for_op(getattr(self, name), self.mask_bits_of(name))

    @contextmanager
    def use_weights(self, weights: dict[str, Tensor]) -> Iterator[None]:
        """Within the block, the layer computes its *dense* forward with ``weights[name]`` in place of
        its masked Parameter ``name`` (no mask applied; gradients flow to the given tensors).

        Scores that need dense gradients (``sparse_engine.pruning.select.forward_with``) use it.
        On a tied weight every layer sharing it uses the given tensor.
        """
        saved = []
        try:
            for name, w in weights.items():
                module, n = self._owner(name)
                saved.append((module, n, module._weight_overrides.get(n)))
                module._weight_overrides[n] = w
            yield
        finally:
            for module, n, previous in reversed(saved):
                if previous is None:
                    module._weight_overrides.pop(n, None)
                else:
                    module._weight_overrides[n] = previous

    def use_weight(self, weight: Tensor):
        """``use_weights({"weight": weight})``."""
        return self.use_weights({self._single_weight("use_weight"): weight})

    # ---- state_dict ----------------------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        mask_checkpoint.save_masks(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mask_checkpoint.load_with_masks(self, super()._load_from_state_dict, state_dict, prefix, local_metadata,
                                        strict, missing_keys, unexpected_keys, error_msgs)

    def __reduce_ex__(self, protocol):
        # Sparse classes made for user subclasses of Linear/Conv exist only once sparsify has run:
        # pickle them by their dense class, and rebuild the sparse class on load.
        reduced = super().__reduce_ex__(protocol)
        if not type(self).__dict__.get("_generated", False):
            return reduced
        from sparse_engine.nn.conversion import new_sparse_instance
        return (new_sparse_instance, (self.dense_type,)) + tuple(reduced[2:])

    def extra_repr(self) -> str:
        owned = [(getattr(self, n).numel(), int(self.mask_of(n).sum())) for n in self._masked_names]
        numel, kept = sum(o[0] for o in owned), sum(o[1] for o in owned)
        return f"{super().extra_repr()}, density={kept / max(numel, 1):.4f}, backend={self.backend!r}"


def check_model(model, argname: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argname}: expected an nn.Module, got {type(model).__name__}")


def sparse_modules(model: nn.Module) -> list[tuple[str, object]]:
    """The sparse layers of ``model`` as ``(name, unit)`` pairs, in module order, one per masked Parameter.

    A unit is the layer itself when its only masked weight is ``weight`` (``SparseLinear``,
    ``SparseConv2d``, ``SparseEmbedding``, ...), else a ``MaskedWeight`` handle named
    ``"<module>.<param>"`` (LSTM/GRU weights, MultiheadAttention's in-projection). A Parameter
    shared by several layers (tied weights) is listed once. Every unit has ``weight``, ``mask``,
    ``mask_bits``, ``set_mask``, ``apply_mask_``, ``mask_version`` and ``use_weight``.
    """
    check_model(model)
    units, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, MaskedModule):
            for unit_name, unit in module.mask_units(name):
                if id(unit.weight) not in seen:
                    seen.add(id(unit.weight))
                    units.append((unit_name, unit))
    return units


def require_input_kind(name: str, unit, what: str) -> str:
    """``unit.input_kind`` (``"linear"`` or ``"conv2d"``) for methods that hook a layer's input
    activations (Wanda, OBS); a clear error for layers whose forward does not receive them."""
    kind = getattr(unit, "input_kind", None)
    if kind not in ("linear", "conv2d"):
        desc = (f"{type(unit.module).__name__}.{unit.name}" if isinstance(unit, MaskedWeight)
                else type(unit).__name__)
        raise ValueError(f"{what} reads each layer's input activations, which only Linear and Conv2d layers receive "
                         f"in their own forward; layer '{name}' ({desc}) does not: exclude it (exclude=[{name!r}])")
    return kind
