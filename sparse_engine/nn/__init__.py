"""Sparse layers and model-level conversion."""
from sparse_engine.nn.mask_optimizer import MaskedOptimizer, mask_optimizer
from sparse_engine.nn.masked_module import MaskedModule
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparse_linear import SparseLinear
from sparse_engine.nn.sparsify import SparsityReport, densify, sparse_modules, sparsify, sparsity_report

__all__ = ["MaskedModule", "SparseLinear", "SparseConv2d", "sparsify", "densify", "sparse_modules",
           "sparsity_report", "SparsityReport", "mask_optimizer", "MaskedOptimizer"]
