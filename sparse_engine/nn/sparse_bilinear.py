"""``SparseBilinear``: ``nn.Bilinear`` with a mask (masked dense fallback).

The weight is ``(out_features, in1_features, in2_features)``; its mask rows are output features
and the columns ``(i, j)`` flattened, so N:M groups run along ``in2`` within each ``in1``.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule


class SparseBilinear(MaskedModule, nn.Bilinear):
    """``nn.Bilinear`` with a mask: ``F.bilinear(x1, x2, W*M, b)``."""

    dense_type = nn.Bilinear

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return F.bilinear(x1, x2, self.effective_weight(), self.bias)
