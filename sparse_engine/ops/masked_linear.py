"""``sparse_engine::masked_linear``: y = x (W*M)^T + b over a bit-packed mask M.

Forward and backward never build W*M in device memory: the kernels apply the mask to tiles of W
as they load them. Autograd saves x, W and the packed mask (1 bit per weight), nothing
weight-sized beyond W itself. The weight gradient is (dY^T X) * M, with exact zeros at pruned
positions, so neither weight decay nor momentum is fed by pruned entries.

Kernels: CPU in ``csrc/cpu`` (C++, OpenMP, row chunks of W), CUDA in ``kernels/masked_linear.py``
(Triton, the default) or ``csrc/cuda/masked_linear.cu`` (``backend="cuda"``).
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from sparse_engine import _C
from sparse_engine.ops.autocast import autocast_inputs
from sparse_engine.ops import dispatch
from sparse_engine.ops.mask_pack import packed_shape, unpack_mask_ref
from sparse_engine.ops.masked_weight import masked_weight_for_op  # also registers the op's fake and CUDA kernels

BACKENDS = ("triton", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def check_masked_weight(weight: Tensor, mask_bits: Tensor, device: torch.device) -> None:
    """Shared argument checks of the masked ops; errors name the argument and the expectation."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight: expected a floating dtype {_FLOAT_DTYPES}, got {weight.dtype}")
    if not isinstance(mask_bits, Tensor):
        raise TypeError(f"mask_bits: expected a torch.Tensor, got {type(mask_bits).__name__}")
    if mask_bits.dtype != torch.int32:
        raise TypeError(f"mask_bits: expected dtype torch.int32 (bit-packed, see pack_mask), got {mask_bits.dtype}")
    expected = packed_shape(weight.shape)
    if tuple(mask_bits.shape) != expected:
        raise ValueError(f"mask_bits: expected shape {expected} for weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(mask_bits.shape)}")
    for name, t in (("weight", weight), ("mask_bits", mask_bits)):
        if t.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the device of the input), got {t.device}")


def check_bias(bias: Optional[Tensor], shape, dtype: torch.dtype, device: torch.device, dims: str = "") -> None:
    """A bias of ``shape`` (an int: ``(out_features,)``; ``dims`` names the axes in the message)."""
    if bias is None:
        return
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != shape:
        raise ValueError(f"bias: expected shape {shape}{f' ({dims})' if dims else ''}, got {tuple(bias.shape)}")
    if bias.dtype != dtype:
        raise TypeError(f"bias: expected dtype {dtype} (the input's), got {bias.dtype}")
    if bias.device != device:
        raise ValueError(f"bias: expected a tensor on {device} (the device of the input), got {bias.device}")


def masked_linear(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor] = None,
                  *, backend: str = "triton") -> Tensor:
    """``y = x (W*M)^T + b`` without materialising ``W*M``.

    Args:
        x: ``(..., K)``, float16/bfloat16/float32 (float64 on CPU); any strides.
        weight: ``(N, K)``, same dtype and device as ``x``.
        mask_bits: ``int32 (N, ceil(K/32))`` from :func:`sparse_engine.pack_mask`.
        bias: ``(N,)`` or None.
        backend: CUDA kernel to use, ``"triton"`` (default) or ``"cuda"`` (C++ in ``csrc/``);
            ignored on CPU.
    Returns:
        ``(..., N)`` in ``x``'s dtype, accumulated in float32 (float64 for float64).

    Under ``torch.autocast`` the inputs are cast as ``F.linear``'s are (``sparse_engine.ops.autocast``).
    The implementation (these kernels, or ``F.linear`` on ``W*M``) is chosen by measurement once per
    shape (``sparse_engine.ops.dispatch``); both give exact-zero weight gradients at pruned positions.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    x, weight, bias = autocast_inputs(x.device.type, x, weight, bias)
    tensors = (x, weight, mask_bits, bias)
    run = functools.partial(_run_implementation, backend=backend)
    # A call like one made before (same shapes, dtypes, devices, backend) skips the checks: on small
    # layers they would cost more than the matmul's own overhead.
    impl = dispatch.lookup("masked_linear", tensors, (backend,))
    if impl is None:
        check_masked_weight(weight, mask_bits, x.device)
        check_backend(backend)
        if weight.dim() != 2:
            raise ValueError(f"weight: expected shape (out_features, in_features), got {tuple(weight.shape)}")
        if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"x: expected last dimension {weight.shape[1]} (weight's in_features), "
                             f"got shape {tuple(x.shape)}")
        if x.dtype != weight.dtype:
            raise TypeError(f"x: expected dtype {weight.dtype} (the weight's), got {x.dtype}")
        check_bias(bias, weight.shape[0], x.dtype, x.device)
        if weight.numel() == 0 or x.numel() == 0:
            # Nothing to mask (K = 0 or N = 0) or no rows: F.linear's result (the bias, or an empty tensor).
            return torch.nn.functional.linear(x, weight, bias)
        impl = dispatch.choose("masked_linear", run, tensors, extra=(backend,))
    return run(impl, tensors)


def _run_implementation(impl: str, tensors: tuple, backend: str) -> Tensor:
    x, weight, mask_bits, bias = tensors
    if impl == "materialized":
        # The op itself: masked_linear has checked its arguments.
        return torch.nn.functional.linear(x, masked_weight_for_op(weight, mask_bits), bias)
    if x.dim() == 2:
        return torch.ops.sparse_engine.masked_linear(x, weight, mask_bits, bias, backend)
    y = torch.ops.sparse_engine.masked_linear(x.reshape(-1, x.shape[-1]), weight, mask_bits, bias, backend)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def masked_linear_ref(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Readable reference: materialises W*M and calls ``F.linear`` (run it in float64)."""
    mask = unpack_mask_ref(mask_bits, weight.shape)
    return torch.nn.functional.linear(x, weight * mask, bias)


def _use_tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


# ---- forward -------------------------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::masked_linear", mutates_args=())
def _masked_linear(x: Tensor, weight: Tensor, mask_bits: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    raise NotImplementedError(f"sparse_engine::masked_linear has no kernel for device '{x.device.type}'")


@_masked_linear.register_kernel("cpu")
def _(x, weight, mask_bits, bias, backend):
    return _C.masked_linear_fwd(x, weight, mask_bits, bias)


@_masked_linear.register_kernel("cuda")
def _(x, weight, mask_bits, bias, backend):
    if backend == "cuda":
        return _C.masked_linear_fwd(x, weight, mask_bits, bias)
    from sparse_engine.kernels.masked_linear import masked_linear_fwd
    return masked_linear_fwd(x, weight, mask_bits, bias, allow_tf32=_use_tf32())


@_masked_linear.register_fake
def _(x, weight, mask_bits, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


# ---- backward: dX = dY (W*M) ---------------------------------------------------------------------

@torch.library.custom_op("sparse_engine::masked_linear_grad_input", mutates_args=())
def _grad_input(dy: Tensor, weight: Tensor, mask_bits: Tensor, backend: str) -> Tensor:
    raise NotImplementedError(f"sparse_engine::masked_linear_grad_input has no kernel for '{dy.device.type}'")


@_grad_input.register_kernel("cpu")
def _(dy, weight, mask_bits, backend):
    return _C.masked_linear_bwd_input(dy, weight, mask_bits)


@_grad_input.register_kernel("cuda")
def _(dy, weight, mask_bits, backend):
    if backend == "cuda":
        return _C.masked_linear_bwd_input(dy, weight, mask_bits)
    from sparse_engine.kernels.masked_linear import masked_linear_bwd_input
    return masked_linear_bwd_input(dy, weight, mask_bits, allow_tf32=_use_tf32())


@_grad_input.register_fake
def _(dy, weight, mask_bits, backend):
    return dy.new_empty((dy.shape[0], weight.shape[1]))


# ---- backward: dW = (dY^T X) * M -----------------------------------------------------------------

@torch.library.custom_op("sparse_engine::masked_linear_grad_weight", mutates_args=())
def _grad_weight(dy: Tensor, x: Tensor, mask_bits: Tensor, backend: str) -> Tensor:
    raise NotImplementedError(f"sparse_engine::masked_linear_grad_weight has no kernel for '{dy.device.type}'")


@_grad_weight.register_kernel("cpu")
def _(dy, x, mask_bits, backend):
    return _C.masked_linear_bwd_weight(dy, x, mask_bits)


@_grad_weight.register_kernel("cuda")
def _(dy, x, mask_bits, backend):
    if backend == "cuda":
        return _C.masked_linear_bwd_weight(dy, x, mask_bits)
    from sparse_engine.kernels.masked_linear import masked_linear_bwd_weight
    return masked_linear_bwd_weight(dy, x, mask_bits, allow_tf32=_use_tf32())


@_grad_weight.register_fake
def _(dy, x, mask_bits, backend):
    return dy.new_empty((dy.shape[1], x.shape[1]))


# ---- autograd ------------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    x, weight, mask_bits, bias, backend = inputs
    ctx.backend = backend
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mask_bits)


def _backward(ctx, dy):
    x, weight, mask_bits = ctx.saved_tensors
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.sparse_engine.masked_linear_grad_input(dy, weight, mask_bits, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = torch.ops.sparse_engine.masked_linear_grad_weight(dy, x, mask_bits, ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        db = dy.sum(0)
    return dx, dw, None, db, None


_masked_linear.register_autograd(_backward, setup_context=_setup_context)
