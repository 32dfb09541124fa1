// Host launcher of topk_mask for CUDA tensors: keep exactly k[g] elements of each group g of score
// tensors, written as bit-packed masks (the contract's rule: rank by score, ties broken by tensor
// index, then flat index; -0.0 == +0.0; NaN is an error). All tensors of a call are selected by
// one launch per pass, through a small device table of their pointers and sizes.
//
// Each score tensor is given in its 2-D selection view (rows, cols) (rank >= 2: rows = shape[0];
// rank <= 1: rows = 1), contiguous; its mask is contiguous int32 (rows, ceil(cols / 32)), every
// word written, padding bits 0.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace sparse_engine::cuda {

struct TopkTensor {
  const void* scores;  // device, contiguous (rows, cols) scores of the call's dtype
  int64_t rows;
  int64_t cols;
  int32_t* mask;       // device, contiguous int32 (rows, ceil(cols / 32)), written
  int64_t group;       // in [0, num_groups)
};

// Bytes of device workspace topk_mask needs for these tensors (host array).
size_t topk_mask_workspace_bytes(const TopkTensor* tensors, int64_t num_tensors, int64_t num_groups);

// tensors, ks: host arrays (num_tensors, num_groups), 0 <= ks[g] <= the number of scores in group g
// (checked by the caller); dtype float32, float16 or bfloat16. workspace: device memory of at
// least topk_mask_workspace_bytes(...). nan_flags: device int32 (num_tensors,), set to 1 for each
// tensor that contains NaN (its group's masks are then meaningless; the caller raises), else 0.
// Everything runs on `stream`; the host waits only for the upload of the tensor table. Returns
// the first launch error, cudaSuccess if none.
cudaError_t topk_mask(DType dtype, const TopkTensor* tensors, int64_t num_tensors, const int64_t* ks,
                      int64_t num_groups, bool largest, void* workspace, size_t workspace_bytes,
                      int32_t* nan_flags, cudaStream_t stream);

}  // namespace sparse_engine::cuda
