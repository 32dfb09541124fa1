"""``SparseBilinear``: ``nn.Bilinear`` with a mask, through the fused masked linear op.

The weight is ``(out_features, in1_features, in2_features)``; its mask rows are output features
and the columns ``(i, j)`` flattened, so N:M groups run along ``in2`` within each ``in1``. That is
exactly the packed mask of the 2-D view ``(out_features, in1_features * in2_features)``
(``sparse_engine.ops.mask_pack`` packs any rank as ``(shape[0], prod(shape[1:]))``), so no repack
is needed: ``y = x1^T (A*M) x2 + b`` is ``masked_linear(outer(x1, x2), A.view(out, in1*in2), M, b)``.

Cost: the outer product ``(*, in1_features * in2_features)`` is built per call (and saved for the
weight gradient): ``B * in1 * in2`` elements, fine for Bilinear's usual sizes, but it grows with
the product of the two input widths.

Autocast: ``F.bilinear`` is not a lower-precision op (CPU autocast leaves it alone, CUDA autocast
promotes its inputs to the widest dtype), so this layer computes in the widest dtype of its
inputs, weight and bias with autocast's casts turned off, as ``F.bilinear`` does.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.ops.autocast import autocast_dtype
from sparse_engine.ops.masked_linear import masked_linear


class SparseBilinear(MaskedModule, nn.Bilinear):
    """``nn.Bilinear`` with a mask: ``y = x1^T (W*M) x2 + b`` through ``sparse_engine::masked_linear``."""

    dense_type = nn.Bilinear

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        override = self.weight_override()
        if override is not None:
            return F.bilinear(x1, x2, override, self.bias)
        for name, x, n in (("x1", x1, "in1_features"), ("x2", x2, "in2_features")):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 1 or x.shape[-1] != getattr(self, n):
                raise ValueError(f"{name}: expected last dimension {getattr(self, n)} ({n}), got shape {tuple(x.shape)}")
        if x1.shape[:-1] != x2.shape[:-1]:
            raise ValueError(f"x1, x2: expected the same leading dimensions, got shapes {tuple(x1.shape)} and "
                             f"{tuple(x2.shape)}")
        device_type = x1.device.type
        if autocast_dtype(device_type) is None:
            return self._fused(x1, x2, self.weight, self.bias)
        # Autocast promotes F.bilinear's inputs to the widest dtype; it does not lower them.
        dtype = x1.dtype
        for t in (x2, self.weight, self.bias):
            dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
        with torch.autocast(device_type, enabled=False):
            return self._fused(x1.to(dtype), x2.to(dtype), self.weight.to(dtype),
                               None if self.bias is None else self.bias.to(dtype))

    def _fused(self, x1: Tensor, x2: Tensor, weight: Tensor, bias) -> Tensor:
        outer = (x1.unsqueeze(-1) * x2.unsqueeze(-2)).flatten(-2)  # (*, in1 * in2), the mask's column order
        return masked_linear(outer, weight.reshape(self.out_features, -1), self.mask_bits_of(), bias,
                             backend=self.backend)
