"""``SparseEmbedding``: ``nn.Embedding`` with a masked lookup (``sparse_engine.ops.masked_embedding``).

The mask is over ``(num_embeddings, embedding_dim)``: a row is a token, and N:M groups run
along the embedding dimension. The lookup gathers only the looked-up rows of the weight and of
the packed mask; the weight's gradient is ``F.embedding``'s (dense, or sparse COO with
``sparse=True``) with exact zeros at pruned entries. As with a dense embedding, autocast leaves
the lookup in the weight's dtype.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.ops.masked_weight import masked_embedding


class SparseEmbedding(MaskedModule, nn.Embedding):
    """``nn.Embedding`` with a mask."""

    dense_type = nn.Embedding

    def forward(self, indices: Tensor) -> Tensor:
        override = self.weight_override()
        if override is not None:
            return F.embedding(indices, override, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        return masked_embedding(indices, self.weight, self.mask_bits_of(), self.padding_idx, self.max_norm,
                                self.norm_type, self.scale_grad_by_freq, self.sparse)
