"""``sparse_engine::stacked_masked_linear``: S masked linears, one per stacked model, in one call.

``y[s] = x[s] (W[s]*M[s])^T + b[s]`` for s < S, each model with its own bit-packed mask
(``sparse_engine.ops.stacked_mask``). The weight gradient is ``(dY[s]^T X[s]) * M[s]``, exact zeros
at pruned positions, as for ``masked_linear``.

Kernels: CUDA runs the Triton GEMMs of ``kernels/stacked_masked_linear.py`` (a grid axis over S,
W*M never in memory). CPU builds ``W*M`` for all S models as a temporary of the weight's size and
runs one batched BLAS call (``baddbmm``/``bmm``): on CPU one batched GEMM over S models is what
makes stacking pay (S small GEMMs one after another leave the cores waiting on dispatch), and the
temporary is freed when the call returns; autograd saves only x, W and the packed masks.
"""
from typing import Optional

import torch
from torch import Tensor

from sparse_engine.ops.autocast import autocast_inputs
from sparse_engine.ops.masked_linear import _FLOAT_DTYPES, _use_tf32, check_bias
from sparse_engine.ops.stacked_mask import (check_stacked_mask_bits, mask_stacked_grad_, stacked_weight_to_read,
                                            unpack_stacked_mask_ref)


def check_stacked_weight(weight: Tensor, mask_bits: Tensor, device: torch.device, rank: int) -> None:
    """Shared argument checks of the stacked masked ops; errors name the argument and the expectation."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight: expected a floating dtype {_FLOAT_DTYPES}, got {weight.dtype}")
    if weight.dim() != rank:
        raise ValueError(f"weight: expected a stacked weight of rank {rank} (models first), "
                         f"got shape {tuple(weight.shape)}")
    check_stacked_mask_bits(mask_bits, weight.shape)
    for name, t in (("weight", weight), ("mask_bits", mask_bits)):
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of the input), got {t.device}")


def check_stacked_bias(bias: Optional[Tensor], shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    check_bias(bias, shape, dtype, device, "models, out_features")


def stacked_masked_linear(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``y[s] = x[s] (W[s]*M[s])^T + b[s]`` for every stacked model s.

    Args:
        x: ``(S, ..., K)``: model s's inputs in ``x[s]`` (``x.expand(S, ...)`` broadcasts one batch).
        weight: ``(S, N, K)``, same dtype and device as ``x``.
        mask_bits: ``int32 (S, N, ceil(K/32))`` (``pack_stacked_mask``).
        bias: ``(S, N)`` or None.
    Returns:
        ``(S, ..., N)`` in ``x``'s dtype. Autocast casts as for ``masked_linear``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
    check_stacked_weight(weight, mask_bits, x.device, 3)
    s, n, k = weight.shape
    if x.dim() < 2 or x.shape[0] != s or x.shape[-1] != k:
        raise ValueError(f"x: expected shape ({s}, ..., {k}) (models first, weight's in_features last), "
                         f"got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
    check_stacked_bias(bias, (s, n), x.dtype, x.device)
    lead = x.shape[1:-1]
    y = torch.ops.sparse_engine.stacked_masked_linear(x.reshape(s, -1, k), weight, mask_bits, bias)
    return y.reshape(s, *lead, n)


def stacked_masked_linear_ref(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Readable reference: a loop of ``F.linear`` over the models on ``W[s]*M[s]`` (run it in float64)."""
    mask = unpack_stacked_mask_ref(mask_bits, weight.shape)
    return torch.stack([torch.nn.functional.linear(x[i], weight[i] * mask[i], None if bias is None else bias[i])
                        for i in range(weight.shape[0])])


# ---- forward -------------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::stacked_masked_linear", mutates_args=())
def _stacked_masked_linear(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor]) -> Tensor:
    raise NotImplementedError(f"sparse_engine::stacked_masked_linear has no kernel for device '{x.device.type}'")


@_stacked_masked_linear.register_kernel("cpu")
def _(x, weight, mask_bits, bias):
    wt = stacked_weight_to_read(weight, mask_bits).transpose(1, 2)
    if bias is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(bias.unsqueeze(1), x, wt)


@_stacked_masked_linear.register_kernel("cuda")
def _(x, weight, mask_bits, bias):
    from sparse_engine.kernels.stacked_masked_linear import stacked_masked_linear_fwd
    return stacked_masked_linear_fwd(x, weight, mask_bits, bias, allow_tf32=_use_tf32())


@_stacked_masked_linear.register_fake
def _(x, weight, mask_bits, bias):
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))


# ---- backward: dX[s] = dY[s] (W[s]*M[s]) --------------------------------------------------------

@torch.library.custom_op("sparse_engine::stacked_masked_linear_grad_input", mutates_args=())
def _grad_input(dy: Tensor, weight: Tensor, mask_bits: Tensor) -> Tensor:
    raise NotImplementedError(f"sparse_engine::stacked_masked_linear_grad_input has no kernel for '{dy.device.type}'")


@_grad_input.register_kernel("cpu")
def _(dy, weight, mask_bits):
    return torch.bmm(dy, stacked_weight_to_read(weight, mask_bits))


@_grad_input.register_kernel("cuda")
def _(dy, weight, mask_bits):
    from sparse_engine.kernels.stacked_masked_linear import stacked_masked_linear_bwd_input
    return stacked_masked_linear_bwd_input(dy, weight, mask_bits, allow_tf32=_use_tf32())


@_grad_input.register_fake
def _(dy, weight, mask_bits):
    return dy.new_empty((dy.shape[0], dy.shape[1], weight.shape[2]))


# ---- backward: dW[s] = (dY[s]^T X[s]) * M[s] ----------------------------------------------------

@torch.library.custom_op("sparse_engine::stacked_masked_linear_grad_weight", mutates_args=())
def _grad_weight(dy: Tensor, x: Tensor, mask_bits: Tensor) -> Tensor:
    raise NotImplementedError(f"sparse_engine::stacked_masked_linear_grad_weight has no kernel for "
                              f"'{dy.device.type}'")


@_grad_weight.register_kernel("cpu")
def _(dy, x, mask_bits):
    return mask_stacked_grad_(torch.bmm(dy.transpose(1, 2), x), mask_bits)


@_grad_weight.register_kernel("cuda")
def _(dy, x, mask_bits):
    from sparse_engine.kernels.stacked_masked_linear import stacked_masked_linear_bwd_weight
    return stacked_masked_linear_bwd_weight(dy, x, mask_bits, allow_tf32=_use_tf32())


@_grad_weight.register_fake
def _(dy, x, mask_bits):
    return dy.new_empty((dy.shape[0], dy.shape[2], x.shape[2]))


# ---- autograd ------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, mask_bits, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mask_bits)


def _backward(ctx, dy):
    x, weight, mask_bits = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparse_engine.stacked_masked_linear_grad_input(dy, weight, mask_bits)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.sparse_engine.stacked_masked_linear_grad_weight(dy, x, mask_bits)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(1)
    return dx, dw, None, db


_stacked_masked_linear.register_autograd(_backward, setup_context=_setup_context)
