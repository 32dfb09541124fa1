"""The masked dense fallback: ``W*M`` as a differentiable tensor, and the masked embedding lookup.

Layers without a fused masked kernel (Conv3d, ConvTranspose, LSTM/GRU/RNN) compute their dense
torch op on ``masked_weight(W, bits)``, and the
``"materialized"`` implementation of ``masked_linear``/``masked_conv2d`` (``sparse_engine.ops.dispatch``)
is the vendor op on it. It is the op ``sparse_engine::masked_weight`` (defined in C++, so a call
costs microseconds, not the ~0.1 ms of a Python custom op): one pass that copies the kept weights
and writes zeros elsewhere, straight from the packed bits (C++ with AVX2 on CPU, Triton on CUDA; no
bool mask). Its gradient is the same op on ``dW``: **exact zeros at pruned positions**,
even where ``dW`` is NaN or inf, which is the contract every sparse layer keeps. It builds ``W*M``
for the duration of the call; autograd keeps only the packed mask. It works under
``torch.compile``, ``torch.export`` and autocast (the dense op after it casts as usual).

``masked_embedding`` never builds ``W*M``: it gathers the looked-up rows of the weight and of the
packed mask, and unpacks only those (memory and time proportional to the lookup, not the table).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_engine import _C
from sparse_engine.ops.mask_pack import packed_shape, selection_shape, unpack_mask, unpack_mask_ref


def _check(weight: Tensor, mask_bits: Tensor) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if not isinstance(mask_bits, Tensor) or mask_bits.dtype != torch.int32:
        raise TypeError(f"mask_bits: expected an int32 tensor (see pack_mask), got "
                        f"{getattr(mask_bits, 'dtype', type(mask_bits).__name__)}")
    expected = packed_shape(weight.shape)
    if tuple(mask_bits.shape) != expected:
        raise ValueError(f"mask_bits: expected shape {expected} for weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(mask_bits.shape)}")
    if mask_bits.device != weight.device:
        raise ValueError(f"mask_bits: expected a tensor on {weight.device} (the weight's device), got {mask_bits.device}")


def masked_weight(weight: Tensor, mask_bits: Tensor) -> Tensor:
    """``W*M`` with gradient ``where(M, dW, 0)``.

    Args:
        weight: any floating dtype, rank >= 2.
        mask_bits: ``int32 (shape[0], ceil(numel / shape[0] / 32))`` from :func:`sparse_engine.pack_mask`.
    Returns:
        a tensor of the weight's shape and dtype, zero where the mask is 0.
    """
    _check(weight, mask_bits)
    return torch.ops.sparse_engine.masked_weight(weight, mask_bits)


def masked_weight_for_op(weight: Tensor, mask_bits: Tensor) -> Tensor:
    """``W*M`` for a dense torch op that reads it and does not modify it or keep it: the library's
    dense fallbacks (``F.linear``/``F.conv*`` of the ``"materialized"`` implementation, torch's RNNs).

    On the CPU in eager mode, a read-only pass checks the pruned entries of ``weight``; when all are
    +0 or -0 (what ``mask_optimizer`` and ``set_mask`` keep) ``weight`` itself already holds the
    values of ``W*M`` and is returned, as a view, without the copy; its gradient is still masked
    (exact zeros at pruned positions). Otherwise (a pruned entry written through ``.data``, a
    non-zero from an optimizer without ``mask_optimizer``), and on GPUs (where the check would wait
    for the device), for non-float weights, and wherever a graph is being recorded or the call
    intercepted (``torch.compile``/``export``, ``torch.jit.trace``, a ``TorchDispatchMode`` such as
    ``make_fx``'s, tensor subclasses, ``torch.func`` transforms: a recorded graph must not depend on
    this call's data), it is :func:`masked_weight`. Either way the op computes with the same values.
    The result may alias ``weight``: never modify it in place, never hand it to users. The gradient
    is masked in place only when nothing else holds it (else a masked copy).
    """
    if (weight.device.type == "cpu" and type(weight) in _PLAIN_TENSORS and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(weight)):
        return _C.masked_weight_for_op(weight, mask_bits)
    return torch.ops.sparse_engine.masked_weight(weight, mask_bits)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


# The op is defined in C++ (csrc/bindings.cpp: schema, CPU kernel, autograd), because a Python
# custom op costs about 0.1 ms per call; its fake and CUDA kernels are registered here.

def _as_2d(weight: Tensor) -> Tensor:
    return weight.reshape(selection_shape(weight.shape))


@torch.library.register_kernel("sparse_engine::masked_weight", "cuda")
def _(weight, mask_bits):
    from sparse_engine.kernels.mask_pack import masked_copy_fwd
    return masked_copy_fwd(_as_2d(weight), mask_bits.contiguous()).view(weight.shape)


@torch.library.register_fake("sparse_engine::masked_weight")
def _(weight, mask_bits):
    return weight.new_empty(weight.shape)


def masked_weight_ref(weight: Tensor, mask_bits: Tensor) -> Tensor:
    """Readable reference of :func:`masked_weight`: the product with the unpacked mask."""
    return weight * unpack_mask_ref(mask_bits, weight.shape)


def masked_embedding(indices: Tensor, weight: Tensor, mask_bits: Tensor, padding_idx: Optional[int] = None,
                     max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                     sparse: bool = False) -> Tensor:
    """``F.embedding(indices, W*M, ...)`` without building ``W*M``.

    Args:
        indices: integer tensor of any shape, values in ``[0, num_embeddings)``.
        weight: ``(num_embeddings, embedding_dim)``.
        mask_bits: ``int32 (num_embeddings, ceil(embedding_dim / 32))``.
        padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse: as ``F.embedding``
            (``max_norm`` renormalises the looked-up rows of ``weight`` in place, as there;
            pruned entries are zeros and stay zeros).
    Returns:
        ``indices.shape + (embedding_dim,)`` in the weight's dtype. The weight's gradient is
        ``F.embedding``'s, zero at pruned entries (a sparse COO gradient with ``sparse=True``,
        whose pruned entries hold exact zeros).
    """
    _check(weight, mask_bits)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (num_embeddings, embedding_dim), got {tuple(weight.shape)}")
    rows = F.embedding(indices, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
    flat = indices.reshape(-1)
    kept = unpack_mask(mask_bits[flat], (flat.shape[0], weight.shape[1]))
    return torch.where(kept.reshape(rows.shape), rows, 0)


def masked_embedding_ref(indices: Tensor, weight: Tensor, mask_bits: Tensor, padding_idx: Optional[int] = None,
                         max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                         sparse: bool = False) -> Tensor:
    """Readable reference of :func:`masked_embedding`: ``F.embedding`` on ``W*M``."""
    return F.embedding(indices, masked_weight_ref(weight, mask_bits), padding_idx, max_norm, norm_type,
                       scale_grad_by_freq, sparse)
