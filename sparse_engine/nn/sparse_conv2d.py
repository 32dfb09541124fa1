"""``SparseConv2d``: a drop-in ``nn.Conv2d`` whose weight is masked by a bit-packed mask."""
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.ops.masked_conv2d import masked_conv2d


class SparseConv2d(MaskedModule, nn.Conv2d):
    """``nn.Conv2d`` with a mask, through ``sparse_engine::masked_conv2d``.

    Parameters keep the names ``weight`` (Co, C/groups, kH, kW) and ``bias``; the mask is the
    buffer ``mask_bits`` over the weight viewed as (Co, C/groups*kH*kW). All of ``nn.Conv2d``'s
    options work: padding modes other than ``"zeros"`` and ``padding="same"``/``"valid"`` pad the
    input first, as ``nn.Conv2d`` does.
    """

    dense_type = nn.Conv2d
    input_kind = "conv2d"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 backend: str = "triton"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
                         backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        override = self.weight_override()
        if override is not None:
            return self._conv_forward(x, override, self.bias)
        x, padding = explicit_padding(self, x)
        return masked_conv2d(x, self.weight, self.mask_bits_of(), self.bias, self.stride, padding, self.dilation,
                             self.groups)


def explicit_padding(conv: nn.Module, x: Tensor) -> tuple[Tensor, tuple]:
    """``(x, padding)`` for a zero-padding masked convolution that computes ``conv`` (a ConvNd).

    As ``nn.ConvNd`` does, padding modes other than ``"zeros"`` and string paddings (``"same"``
    may need asymmetric padding) pad the input explicitly, then convolve unpadded.
    """
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), (0,) * len(conv.kernel_size)
    return x, conv.padding
