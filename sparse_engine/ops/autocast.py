"""Autocast for the custom ops: the cast policy of ``F.linear``/``F.conv*``.

``torch.library`` custom ops are opaque to ``torch.autocast``: an fp32 weight meets a bf16
activation inside the op. The public wrappers of the matmul-shaped ops (``masked_linear``,
``masked_conv2d``) therefore cast their inputs as autocast casts ``F.linear``'s (its
"lower precision" list): inside an enabled autocast region for the inputs' device type, every
floating-point tensor except float64 goes to the region's dtype (``torch.get_autocast_dtype``).
The casts are ordinary differentiable ``Tensor.to`` calls, so gradients flow back to the fp32
weights in fp32, as with ``F.linear``, and ``torch.compile`` traces them.
"""
from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts matmul inputs to on ``device_type`` now, or None outside autocast."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(device_type: str, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """``tensors`` cast as autocast casts ``F.linear``'s arguments (None and non-tensors pass through)."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
