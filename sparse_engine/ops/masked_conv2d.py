"""``sparse_engine::masked_conv2d``: ``conv2d(x, W*M) + b`` over a bit-packed mask M.

CUDA runs implicit-GEMM Triton kernels (``kernels/masked_conv2d.py``) that apply the mask to
weight tiles in registers, so W*M never exists in device memory. The CPU kernel is plain torch:
it builds W*M (``masked_weight``, one pass from the packed bits) as a temporary for the call
(convolution weights are small next to activations) and frees it; autograd still saves only x, W
and the packed mask.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_engine.ops.autocast import autocast_inputs
from sparse_engine.ops import dispatch
from sparse_engine.ops.mask_pack import apply_mask_, unpack_mask_ref
from sparse_engine.ops.masked_weight import masked_weight_for_op
from sparse_engine.ops.masked_linear import check_bias, check_masked_weight


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(v, name: str) -> list[int]:
    if _is_int(v):
        return [v, v]
    if not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_int(i) for i in v):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return list(v)


def check_conv_geometry(image, kernel, stride, padding, dilation) -> tuple:
    """``(stride, padding, dilation)`` as pairs, checked against the input's ``image`` (H, W) and the
    ``kernel`` (KH, KW): positive strides and dilations, padding >= 0, and a padded input no smaller
    than the kernel's span."""
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"stride/dilation must be >= 1 and padding >= 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    for i, name in enumerate(("height", "width")):
        span = dilation[i] * (kernel[i] - 1) + 1
        if image[i] + 2 * padding[i] < span:
            raise ValueError(f"x: padded input {name} {image[i] + 2 * padding[i]} is smaller than the "
                             f"kernel's span {span}")
    return stride, padding, dilation


def masked_conv2d(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor] = None,
                  stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """``F.conv2d(x, W*M, bias, stride, padding, dilation, groups)`` without materialising W*M on GPU.

    Args:
        x: ``(N, C, H, W)`` (or unbatched ``(C, H, W)``), float16/bfloat16/float32 (float64 on CPU).
        weight: ``(Co, C/groups, KH, KW)``, same dtype/device as ``x``.
        mask_bits: ``int32 (Co, ceil(C/groups*KH*KW/32))`` from :func:`sparse_engine.pack_mask`.
        bias: ``(Co,)`` or None.
        stride, padding, dilation: int or pair of ints (zero padding; use ``SparseConv2d`` for the
            other padding modes and for ``"same"``/``"valid"``).

    Precision on CUDA: float32 follows ``torch.backends.cudnn.allow_tf32`` as ``F.conv2d`` does, and
    that flag is True by default, so float32 products run on TF32 tensor cores (10-bit mantissas,
    errors near 1e-3 relative) unless it is set to False; the raw float32 inputs are fed to the TF32
    instructions, as cuDNN does. Compare with cuDNN under the same flag, or set it to False for
    IEEE float32 products (slower). Accumulation is float32 for every input dtype.

    The implementation (these kernels, or ``F.conv2d`` on ``W*M``) is chosen by measurement once per
    shape (``sparse_engine.ops.dispatch``); both give exact-zero weight gradients at pruned positions.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)  # F.conv2d's autocast policy
    check_masked_weight(weight, mask_bits, x.device)
    if weight.dim() != 4:
        raise ValueError(f"weight: expected shape (out_channels, in_channels/groups, kH, kW), got {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
    if not _is_int(groups) or groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"groups: expected a positive int dividing out_channels={weight.shape[0]}, got {groups!r}")
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"x: expected shape (N, {weight.shape[1] * groups}, H, W), got {tuple(x.shape)}")
    check_bias(bias, weight.shape[0], x.dtype, x.device)
    stride, padding, dilation = check_conv_geometry(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    conv = (stride, padding, dilation, groups)
    run = functools.partial(_run_implementation, conv=conv)
    impl = dispatch.choose("masked_conv2d", run, (x, weight, mask_bits, bias), extra=(x.is_contiguous(), *conv))
    y = run(impl, (x, weight, mask_bits, bias))
    return y.squeeze(0) if unbatched else y


def _run_implementation(impl: str, tensors: tuple, conv: tuple) -> Tensor:
    x, weight, mask_bits, bias = tensors
    if impl == "materialized":
        return F.conv2d(x, masked_weight_for_op(weight, mask_bits), bias, *conv)
    return torch.ops.sparse_engine.masked_conv2d(x, weight, mask_bits, bias, *conv)


def masked_conv2d_ref(x, weight, mask_bits, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Readable reference: materialises W*M and calls ``F.conv2d`` (run it in float64)."""
    mask = unpack_mask_ref(mask_bits, weight.shape)
    return F.conv2d(x, weight * mask, bias, stride, padding, dilation, groups)


def _use_tf32() -> bool:
    # cuDNN's flag, which is what F.conv2d on a GPU obeys.
    return torch.backends.cudnn.allow_tf32


def _masked_weight_cpu(weight, mask_bits):
    return torch.ops.sparse_engine.masked_weight(weight, mask_bits)


# ---- forward -------------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::masked_conv2d", mutates_args=())
def _masked_conv2d(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor], stride: list[int],
                   padding: list[int], dilation: list[int], groups: int) -> Tensor:
    raise NotImplementedError(f"sparse_engine::masked_conv2d has no kernel for device '{x.device.type}'")


@_masked_conv2d.register_kernel("cpu")
def _(x, weight, mask_bits, bias, stride, padding, dilation, groups):
    # contiguous, as the fake promises (F.conv2d keeps a channels-last input's layout)
    return F.conv2d(x, _masked_weight_cpu(weight, mask_bits), bias, stride, padding, dilation, groups).contiguous()


@_masked_conv2d.register_kernel("cuda")
def _(x, weight, mask_bits, bias, stride, padding, dilation, groups):
    from sparse_engine.kernels.masked_conv2d import masked_conv2d_fwd
    return masked_conv2d_fwd(x, weight, mask_bits, bias, stride, padding, dilation, groups,
                             allow_tf32=_use_tf32())


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@_masked_conv2d.register_fake
def _(x, weight, mask_bits, bias, stride, padding, dilation, groups):
    oh = _out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    ow = _out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


# ---- backward: dX --------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::masked_conv2d_grad_input", mutates_args=())
def _grad_input(dy: Tensor, weight: Tensor, mask_bits: Tensor, x_shape: list[int], stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
    raise NotImplementedError(f"sparse_engine::masked_conv2d_grad_input has no kernel for '{dy.device.type}'")


@_grad_input.register_kernel("cpu")
def _(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups):
    return torch.nn.grad.conv2d_input(x_shape, _masked_weight_cpu(weight, mask_bits), dy, stride, padding,
                                      dilation, groups).contiguous()


@_grad_input.register_kernel("cuda")
def _(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups):
    from sparse_engine.kernels.masked_conv2d import masked_conv2d_bwd_input
    return masked_conv2d_bwd_input(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups,
                                   allow_tf32=_use_tf32())


@_grad_input.register_fake
def _(dy, weight, mask_bits, x_shape, stride, padding, dilation, groups):
    return dy.new_empty(x_shape)


# ---- backward: dW = conv2d_weight(x, dY) * M -----------------------------------------------------

@torch.library.custom_op("sparse_engine::masked_conv2d_grad_weight", mutates_args=())
def _grad_weight(dy: Tensor, x: Tensor, mask_bits: Tensor, weight_shape: list[int], stride: list[int],
                 padding: list[int], dilation: list[int], groups: int) -> Tensor:
    raise NotImplementedError(f"sparse_engine::masked_conv2d_grad_weight has no kernel for '{dy.device.type}'")


@_grad_weight.register_kernel("cpu")
def _(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups):
    dw = torch.nn.grad.conv2d_weight(x, weight_shape, dy, stride, padding, dilation, groups).contiguous()
    return apply_mask_(dw, mask_bits)


@_grad_weight.register_kernel("cuda")
def _(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups):
    from sparse_engine.kernels.masked_conv2d import masked_conv2d_bwd_weight
    return masked_conv2d_bwd_weight(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups,
                                    allow_tf32=_use_tf32())


@_grad_weight.register_fake
def _(dy, x, mask_bits, weight_shape, stride, padding, dilation, groups):
    return dy.new_empty(weight_shape)


# ---- autograd ------------------------------------------------------------------------------------

def conv_setup_context(ctx, inputs, output):
    """setup_context of a masked convolution op ``(x, weight, mask_bits, bias, stride, padding,
    dilation, groups)``: this op's and the stacked one's."""
    x, weight, mask_bits, bias, stride, padding, dilation, groups = inputs
    ctx.conv = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None
    ctx.x_shape = list(x.shape)
    ctx.weight_shape = list(weight.shape)
    ctx.save_for_backward(x, weight, mask_bits)


def conv_backward(grad_input: str, grad_weight: str, bias_dims: tuple):
    """The backward of a masked convolution op whose gradients are the ops
    ``torch.ops.sparse_engine.<grad_input>`` and ``<grad_weight>``; the bias gradient sums dy over
    ``bias_dims``."""
    def backward(ctx, dy):
        x, weight, mask_bits = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = getattr(torch.ops.sparse_engine, grad_input)(dy, weight, mask_bits, ctx.x_shape, *ctx.conv)
        if ctx.needs_input_grad[1]:
            dw = getattr(torch.ops.sparse_engine, grad_weight)(dy, x, mask_bits, ctx.weight_shape, *ctx.conv)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(bias_dims)
        return dx, dw, None, db, None, None, None, None
    return backward


_masked_conv2d.register_autograd(conv_backward("masked_conv2d_grad_input", "masked_conv2d_grad_weight", (0, 2, 3)),
                                 setup_context=conv_setup_context)
