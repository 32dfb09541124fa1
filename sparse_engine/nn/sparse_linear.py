"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is masked by a bit-packed mask."""
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.ops.masked_linear import masked_linear


class SparseLinear(MaskedModule, nn.Linear):
    """``nn.Linear`` with a mask: ``y = x (W*M)^T + b`` through ``sparse_engine::masked_linear``.

    Parameters keep the names ``weight`` (out_features, in_features) and ``bias``; the mask is the
    buffer ``mask_bits`` (int32, 1 bit per weight). ``backend`` picks the CUDA kernel
    (``"triton"`` or ``"cuda"``) and is ignored on CPU.
    """

    dense_type = nn.Linear
    input_kind = "linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 backend: str = "triton"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype, backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        override = self.weight_override()
        if override is not None:
            return F.linear(x, override, self.bias)
        return masked_linear(x, self.weight, self.mask_bits_of(), self.bias, backend=self.backend)
