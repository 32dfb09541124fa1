"""Sparse versions of the other convolutions: Conv1d, Conv3d, ConvTranspose1d/2d/3d.

* ``SparseConv1d`` runs the fused ``masked_conv2d`` on a height-1 view: a Conv1d weight
  ``(Co, Ci/g, k)`` and its ``(Co, Ci/g, 1, k)`` view have the same packed mask.
* ``SparseConv3d`` and ``SparseConvTranspose{1,2,3}d`` use the masked dense fallback: torch's own
  convolution on ``masked_weight(W, bits)`` (exact-zero gradient at pruned positions).

Masks follow the library's layout: rows are the weight's first dimension, columns the rest
flattened. For a transposed convolution the weight is ``(Ci, Co/groups, *k)``, so a mask row is
an *input* channel and N:M groups run along ``(co, *k)``.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparse_conv2d import explicit_padding
from sparse_engine.ops.masked_conv2d import masked_conv2d


class SparseConv1d(MaskedModule, nn.Conv1d):
    """``nn.Conv1d`` with a mask, through ``sparse_engine::masked_conv2d`` (fused)."""

    dense_type = nn.Conv1d

    def forward(self, x: Tensor) -> Tensor:
        override = self.weight_override()
        if override is not None:
            return self._conv_forward(x, override, self.bias)
        x, padding = explicit_padding(self, x)
        y = masked_conv2d(x.unsqueeze(-2), self.weight.unsqueeze(-2), self.mask_bits_of(), self.bias,
                          (1, self.stride[0]), (0, padding[0]), (1, self.dilation[0]), self.groups)
        return y.squeeze(-2)  # unbatched (C, L) inputs work too: masked_conv2d takes (C, 1, L)


class SparseConv3d(MaskedModule, nn.Conv3d):
    """``nn.Conv3d`` with a mask (masked dense fallback)."""

    dense_type = nn.Conv3d

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self._forward_weight(), self.bias)


class _SparseConvTranspose(MaskedModule):
    """``nn.ConvTransposeNd.forward`` on the masked weight (masked dense fallback)."""

    _functional = None
    _spatial_dims = 0

    def forward(self, x: Tensor, output_size=None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for {self.dense_type.__name__}")
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              self._spatial_dims, self.dilation)
        return type(self)._functional(x, self._forward_weight(), self.bias, self.stride, self.padding,
                                      output_padding, self.groups, self.dilation)


class SparseConvTranspose1d(_SparseConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with a mask (masked dense fallback)."""
    dense_type = nn.ConvTranspose1d
    _functional = F.conv_transpose1d
    _spatial_dims = 1


class SparseConvTranspose2d(_SparseConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with a mask (masked dense fallback)."""
    dense_type = nn.ConvTranspose2d
    _functional = F.conv_transpose2d
    _spatial_dims = 2


class SparseConvTranspose3d(_SparseConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with a mask (masked dense fallback)."""
    dense_type = nn.ConvTranspose3d
    _functional = F.conv_transpose3d
    _spatial_dims = 3
