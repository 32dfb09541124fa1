"""Sparse layers and model-level conversion."""
from sparse_engine.nn.conversion import SPARSE_TYPES
from sparse_engine.nn.mask_checkpoint import missing_masks
from sparse_engine.nn.mask_optimizer import MaskedOptimizer, mask_optimizer
from sparse_engine.nn.masked_module import MaskedModule, MaskedWeight, sparse_modules
from sparse_engine.nn.report import SparsityReport, sparsity_report
from sparse_engine.nn.sparse_attention import SparseMultiheadAttention
from sparse_engine.nn.sparse_bilinear import SparseBilinear
from sparse_engine.nn.sparse_conv import (SparseConv1d, SparseConv3d, SparseConvTranspose1d, SparseConvTranspose2d,
                                          SparseConvTranspose3d)
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparse_embedding import SparseEmbedding
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.nn.sparse_recurrent import SparseGRU, SparseLSTM, SparseRNN
from sparse_engine.nn.sparsify import densify, sparsify

__all__ = ["MaskedModule", "MaskedWeight", "SparseLinear", "SparseConv2d", "sparsify", "densify", "sparse_modules",
           "sparsity_report", "SparsityReport", "mask_optimizer", "MaskedOptimizer", "missing_masks", "SPARSE_TYPES",
           "SparseConv1d", "SparseConv3d", "SparseConvTranspose1d", "SparseConvTranspose2d", "SparseConvTranspose3d",
           "SparseEmbedding", "SparseBilinear", "SparseLSTM", "SparseGRU", "SparseRNN", "SparseMultiheadAttention"]
