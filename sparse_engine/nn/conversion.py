"""Which torch layers have sparse versions, and how one layer is converted (or why it is not).

``SPARSE_TYPES`` maps each supported torch layer type to its sparse class. A *subclass* of a
supported type (a user's ``class MyLinear(nn.Linear)``, torch's
``NonDynamicallyQuantizableLinear``) is converted to a sparse class generated for it, which keeps
the subclass's methods and attributes, provided it does not override the methods that compute
with the weight (``forward``, and ``_conv_forward`` for convolutions): such a subclass may use
its weight where the mask cannot apply, and is left dense with that reason.
"""
from typing import Optional

from torch import nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparse_attention import SparseMultiheadAttention
from sparse_engine.nn.sparse_bilinear import SparseBilinear
from sparse_engine.nn.sparse_conv import (SparseConv1d, SparseConv3d, SparseConvTranspose1d, SparseConvTranspose2d,
                                          SparseConvTranspose3d)
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparse_embedding import SparseEmbedding
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.nn.sparse_recurrent import SparseGRU, SparseLSTM, SparseRNN

SPARSE_TYPES: dict[type, type] = {
    cls.dense_type: cls for cls in (
        SparseLinear, SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose1d, SparseConvTranspose2d,
        SparseConvTranspose3d, SparseEmbedding, SparseBilinear, SparseLSTM, SparseGRU, SparseRNN,
        SparseMultiheadAttention)
}
# Methods through which a layer type computes with its weight: a subclass overriding one is refused.
_WEIGHT_METHODS = ("forward", "_conv_forward")
_generated: dict[type, type] = {}


def supported_base(cls: type) -> Optional[type]:
    """The supported torch layer type ``cls`` is or derives from, or None."""
    for base in cls.__mro__:
        if base in SPARSE_TYPES:
            return base
    return None


def sparse_class_for(cls: type) -> tuple[Optional[type], str]:
    """``(sparse class, "")`` for a dense layer class, or ``(None, why it cannot be converted)``."""
    base = supported_base(cls)
    if base is None:
        return None, f"{cls.__name__} has no sparse version"
    if cls is base:
        return SPARSE_TYPES[base], ""
    for sub in cls.__mro__[:cls.__mro__.index(base)]:
        overridden = [m for m in _WEIGHT_METHODS if m in sub.__dict__]
        if overridden:
            return None, (f"{cls.__name__} subclasses {base.__name__} but overrides {overridden[0]}() (in "
                          f"{sub.__name__}), which may use the weight where no mask applies")
    if cls not in _generated:
        sparse = SPARSE_TYPES[base]
        _generated[cls] = type(f"Sparse{cls.__name__}", (sparse, cls),
                               {"dense_type": cls, "_generated": True, "__module__": __name__,
                                "__doc__": f"{sparse.__name__} for the subclass {cls.__qualname__} (generated)."})
    return _generated[cls], ""


def new_sparse_instance(dense_type: type) -> MaskedModule:
    """An empty instance of the sparse class of ``dense_type`` (unpickling; see ``MaskedModule.__reduce_ex__``)."""
    cls, reason = sparse_class_for(dense_type)
    if cls is None:
        raise TypeError(f"cannot rebuild a sparse layer for {dense_type.__name__}: {reason}")
    return cls.__new__(cls)


def convert_module(module: nn.Module, backend: str, tied: Optional[dict] = None,
                   called_by_parent: bool = False) -> MaskedModule:
    """Turn ``module`` into its sparse class in place, with dense masks (same Parameters).

    Only ``module`` itself: a MultiheadAttention's ``out_proj`` is converted by its own call.

    ``called_by_parent``: the parent computes with this layer's weight without calling its forward
    (``MultiheadAttention.out_proj``): input hooks never see its input, so it has no ``input_kind``.
    """
    cls, reason = sparse_class_for(type(module))
    if cls is None:
        raise TypeError(f"module: {reason}")
    module.__class__ = cls
    if called_by_parent:
        module.input_kind = None
    module._init_masks(backend, tied=tied)
    return module


def dense_reason(module: nn.Module, param_name: str, parent: Optional[nn.Module], child_name: str) -> str:
    """Why the weight Parameter ``param_name`` of ``module`` is not in a sparse layer."""
    if isinstance(module, MaskedModule):
        return f"not a masked weight of {type(module).__name__}"
    if isinstance(parent, nn.MultiheadAttention) and child_name == "out_proj" and not isinstance(parent, MaskedModule):
        return "used by its parent MultiheadAttention, which was not converted"
    cls, reason = sparse_class_for(type(module))
    if cls is None:
        if supported_base(type(module)) is None:
            return (f"a Parameter of {type(module).__name__}, which has no sparse version (supported: "
                    f"{', '.join(t.__name__ for t in SPARSE_TYPES)} and their subclasses)")
        return reason
    if param_name not in cls.default_masked_weights(module):
        return f"{type(module).__name__} does not mask {param_name}"
    return "not converted (excluded, or not matched by include)"
