"""``sparse_engine::stacked_masked_conv2d``: S masked 2-D convolutions, one per stacked model, in one call.

``y[s] = conv2d(x[s], W[s]*M[s]) + b[s]`` for s < S. The S convolutions run as **one grouped
convolution** with ``groups = S * groups``: the models' channels are laid side by side
(``(B, S*C, H, W)``), and each group of the grouped convolution sees only its own model's
channels and weights, so the result is exactly S separate convolutions, computed by one cuDNN /
oneDNN call, on ``W*M`` built as a temporary of the weight's size (convolution weights are small
next to activations). On CUDA the op runs the implicit-GEMM Triton kernels of
``kernels/masked_conv2d.py`` with a model axis instead (the models' groups are one grid axis; W*M
never in memory). Autograd saves only x, W and the packed masks; the weight gradient is
``conv2d_weight(...) * M``, exact zeros at pruned positions.

Like the single-model ops, the call dispatches by measurement (``sparse_engine.ops.dispatch``)
between the op (``"fused"``) and ``"materialized"``: on CUDA the grouped cuDNN convolution on ``W*M``
built by the ``masked_weight`` op; on CPU the vendor convolution once per model on its masked weight
(``masked_weight_for_op``: W itself where its pruned entries are zeros), which is faster than oneDNN's
grouped convolution with S groups on some shapes (the demo CNN's) and never slower than the models run
one after another.
"""
from typing import Optional

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_engine.ops import dispatch
from sparse_engine.ops.autocast import autocast_inputs
from sparse_engine.ops.masked_conv2d import (_is_int, _out_size, _use_tf32, check_conv_geometry, conv_backward,
                                              conv_setup_context)
from sparse_engine.ops.stacked_mask import (mask_stacked_grad_, stacked_masked_weight_for_op, stacked_weight_to_read,
                                            unpack_stacked_mask_ref)
from sparse_engine.ops.stacked_masked_linear import check_stacked_bias, check_stacked_weight


def stacked_masked_conv2d(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor] = None,
                          stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d(x[s], W[s]*M[s], b[s], stride, padding, dilation, groups)`` for every stacked model s.

    Args:
        x: ``(S, B, C, H, W)``.
        weight: ``(S, Co, C/groups, kH, kW)``, same dtype and device as ``x``.
        mask_bits: ``int32 (S, Co, ceil(C/groups*kH*kW/32))`` (``pack_stacked_mask``).
        bias: ``(S, Co)`` or None.
        stride, padding, dilation: int or pair of ints (zero padding).
    Returns:
        ``(S, B, Co, OH, OW)``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
    check_stacked_weight(weight, mask_bits, x.device, 5)
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
    s, co = weight.shape[:2]
    if not _is_int(groups) or groups < 1 or co % groups:
        raise ValueError(f"groups: expected a positive int dividing out_channels={co}, got {groups!r}")
    if x.dim() != 5 or x.shape[0] != s or x.shape[2] != weight.shape[2] * groups:
        raise ValueError(f"x: expected shape ({s}, B, {weight.shape[2] * groups}, H, W), got {tuple(x.shape)}")
    check_stacked_bias(bias, (s, co), x.dtype, x.device)
    stride, padding, dilation = check_conv_geometry(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    conv = (stride, padding, dilation, groups)
    run = functools.partial(_run_implementation, conv=conv)
    tensors = (x, weight, mask_bits, bias)
    # keyed by one model's shapes: a model computes alike in stacks of any size (a sweep resumes in other sizes)
    impl = dispatch.choose("stacked_masked_conv2d", run, tensors, extra=conv,
                           key_tensors=tuple(None if t is None else t[0] for t in tensors))
    return run(impl, tensors)


def _run_implementation(impl: str, tensors: tuple, conv: tuple) -> Tensor:
    x, weight, mask_bits, bias = tensors
    if impl == "materialized":
        s = weight.shape[0]
        stride, padding, dilation, groups = conv
        if x.device.type == "cpu":  # the vendor convolution once per model, on its masked weight
            weights = stacked_masked_weight_for_op(weight, mask_bits)
            biases = [None] * s if bias is None else bias.unbind(0)  # unbind: one backward node, no zero-fills
            return torch.stack([F.conv2d(xk, wk, bk, stride, padding, dilation, groups)
                                for xk, wk, bk in zip(x.unbind(0), weights.unbind(0), biases)])
        flat = torch.ops.sparse_engine.masked_weight(weight.reshape(-1, *weight.shape[2:]),
                                                     mask_bits.reshape(-1, mask_bits.shape[2]))
        y = F.conv2d(_side_by_side(x), flat, None if bias is None else bias.reshape(-1), stride, padding, dilation,
                     groups * s)
        return _stacked(y, s)
    return torch.ops.sparse_engine.stacked_masked_conv2d(x, weight, mask_bits, bias, *conv)


def stacked_masked_conv2d_ref(x, weight, mask_bits, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Readable reference: a loop of ``F.conv2d`` over the models on ``W[s]*M[s]`` (run it in float64)."""
    mask = unpack_stacked_mask_ref(mask_bits, weight.shape)
    return torch.stack([F.conv2d(x[i], weight[i] * mask[i], None if bias is None else bias[i], stride, padding,
                                 dilation, groups) for i in range(weight.shape[0])])


# The grouped-convolution layout: (S, B, C, H, W) <-> (B, S*C, H, W) and (S, Co, ...) <-> (S*Co, ...).

def _side_by_side(t: Tensor) -> Tensor:
    s, b, c, h, w = t.shape
    return t.transpose(0, 1).reshape(b, s * c, h, w)


def _stacked(t: Tensor, s: int) -> Tensor:
    b, sc, h, w = t.shape
    return t.reshape(b, s, sc // s, h, w).transpose(0, 1).contiguous()


def _flat_weight(weight: Tensor, mask_bits: Tensor) -> Tensor:
    return stacked_weight_to_read(weight, mask_bits).reshape(-1, *weight.shape[2:])


# ---- forward -------------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::stacked_masked_conv2d", mutates_args=(), device_types="cpu")
def _stacked_masked_conv2d(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor], stride: list[int],
                           padding: list[int], dilation: list[int], groups: int) -> Tensor:
    s = weight.shape[0]
    y = F.conv2d(_side_by_side(x), _flat_weight(weight, mask_bits), None if bias is None else bias.reshape(-1),
                 stride, padding, dilation, groups * s)
    return _stacked(y, s)


@_stacked_masked_conv2d.register_kernel("cuda")
def _(x, weight, mask_bits, bias, stride, padding, dilation, groups):
    from sparse_engine.kernels.masked_conv2d import stacked_masked_conv2d_fwd
    return stacked_masked_conv2d_fwd(x, weight, mask_bits.contiguous(), bias, stride, padding, dilation, groups,
                                     allow_tf32=_use_tf32())


@_stacked_masked_conv2d.register_fake
def _(x, weight, mask_bits, bias, stride, padding, dilation, groups):
    oh = _out_size(x.shape[3], weight.shape[3], stride[0], padding[0], dilation[0])
    ow = _out_size(x.shape[4], weight.shape[4], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1], oh, ow))


# ---- backward: dX --------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::stacked_masked_conv2d_grad_input", mutates_args=(), device_types="cpu")
def _grad_input(dy: Tensor, weight: Tensor, mask_bits: Tensor, x_shape: list[int], stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
    s, b, c, h, w = x_shape
    dx = torch.nn.grad.conv2d_input([b, s * c, h, w], _flat_weight(weight, mask_bits), _side_by_side(dy),
                                    stride, padding, dilation, groups * s)
    return _stacked(dx, s)


@_grad_input.register_kernel("cuda")
def _(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups):
    from sparse_engine.kernels.masked_conv2d import stacked_masked_conv2d_bwd_input
    return stacked_masked_conv2d_bwd_input(dy, weight, mask_bits.contiguous(), x_shape, stride, padding, dilation,
                                           groups, allow_tf32=_use_tf32())


@_grad_input.register_fake
def _(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups):
    return dy.new_empty(x_shape)


# ---- backward: dW = conv2d_weight(x, dY) * M -----------------------------------------------------

@torch.library.custom_op("sparse_engine::stacked_masked_conv2d_grad_weight", mutates_args=(), device_types="cpu")
def _grad_weight(dy: Tensor, x: Tensor, mask_bits: Tensor, weight_shape: list[int], stride: list[int],
                 padding: list[int], dilation: list[int], groups: int) -> Tensor:
    s = weight_shape[0]
    dw = torch.nn.grad.conv2d_weight(_side_by_side(x), [s * weight_shape[1]] + weight_shape[2:], _side_by_side(dy),
                                     stride, padding, dilation, groups * s).reshape(weight_shape)
    return mask_stacked_grad_(dw, mask_bits)


@_grad_weight.register_kernel("cuda")
def _(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups):
    from sparse_engine.kernels.masked_conv2d import stacked_masked_conv2d_bwd_weight
    return stacked_masked_conv2d_bwd_weight(dy, x, mask_bits.contiguous(), weight_shape, stride, padding, dilation,
                                            groups, allow_tf32=_use_tf32())


@_grad_weight.register_fake
def _(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups):
    return dy.new_empty(weight_shape)


# ---- autograd ------------------------------------------------------------------------------------

_stacked_masked_conv2d.register_autograd(
    conv_backward("stacked_masked_conv2d_grad_input", "stacked_masked_conv2d_grad_weight", (1, 3, 4)),
    setup_context=conv_setup_context)
