"""``torch.library`` custom ops (``sparse_engine::*``) with their CPU/CUDA kernels and ``*_ref``
references in plain torch."""
from sparse_engine.ops.block_solve import (block_cholesky, block_cholesky_ref, block_cholesky_solve,
                                           block_cholesky_solve_ref, block_solve)
from sparse_engine.ops.mask_pack import (apply_mask_, apply_mask_ref, pack_mask, pack_mask_ref, unpack_mask,
                                         unpack_mask_ref)
from sparse_engine.ops.masked_conv2d import masked_conv2d, masked_conv2d_ref
from sparse_engine.ops.masked_linear import masked_linear, masked_linear_ref
from sparse_engine.ops.topk_mask import topk_mask, topk_mask_ref

__all__ = [
    "pack_mask", "pack_mask_ref", "unpack_mask", "unpack_mask_ref", "apply_mask_", "apply_mask_ref",
    "masked_linear", "masked_linear_ref",
    "masked_conv2d", "masked_conv2d_ref",
    "topk_mask", "topk_mask_ref",
    "block_cholesky", "block_cholesky_ref", "block_cholesky_solve", "block_cholesky_solve_ref", "block_solve",
]
