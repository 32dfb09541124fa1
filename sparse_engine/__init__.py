"""sparse_engine: fast neural-network pruning and sparse retraining for PyTorch.

Sparse layers keep a bit-packed mask (1 bit per weight) and run fused masked kernels that never
build W*M. See README.md for a tour.
"""
import torch  # noqa: F401  (loads libc10 and friends, which _C links against)

from sparse_engine import _C  # noqa: F401  (the compiled CPU/CUDA kernels; fails loudly if not built)
from sparse_engine.nn import (MaskedModule, MaskedOptimizer, SparseConv2d, SparseLinear, SparsityReport, densify,
                              mask_optimizer, sparse_modules, sparsify, sparsity_report)
from sparse_engine.ops import masked_conv2d, masked_linear, pack_mask, topk_mask, unpack_mask
from sparse_engine.pruning import prune_
# Every weight type, masks in checkpoints, export (issue 10).
from sparse_engine.export import load_safetensors, save_safetensors, to_sparse
from sparse_engine.nn import (SPARSE_TYPES, MaskedWeight, SparseBilinear, SparseConv1d, SparseConv3d,
                              SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d, SparseEmbedding,
                              SparseGRU, SparseLSTM, SparseMultiheadAttention, SparseRNN, missing_masks)

__version__ = "0.1.0"

__all__ = [
    "SparseLinear", "SparseConv2d", "MaskedModule", "sparsify", "densify", "sparse_modules", "sparsity_report",
    "SparsityReport", "mask_optimizer", "MaskedOptimizer", "masked_linear", "masked_conv2d", "pack_mask",
    "unpack_mask", "topk_mask", "prune_",
    "MaskedWeight", "SPARSE_TYPES", "SparseConv1d", "SparseConv3d", "SparseConvTranspose1d", "SparseConvTranspose2d",
    "SparseConvTranspose3d", "SparseEmbedding", "SparseBilinear", "SparseLSTM", "SparseGRU", "SparseRNN",
    "SparseMultiheadAttention", "missing_masks", "to_sparse", "save_safetensors", "load_safetensors",
]
