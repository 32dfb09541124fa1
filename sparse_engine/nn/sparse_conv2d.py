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

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None,
                 backend: str = "triton"):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        self._init_mask(backend)

    def forward(self, x: Tensor) -> Tensor:
        padding = self.padding
        if isinstance(padding, str) or self.padding_mode != "zeros":
            # As nn.Conv2d: pad explicitly ("same" may need asymmetric padding), then convolve unpadded.
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0, 0)
        return masked_conv2d(x, self.weight, self.mask_bits, self.bias, self.stride, padding, self.dilation,
                             self.groups)
