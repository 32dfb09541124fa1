// Host launchers for packing a bool mask into the contract's int32 bit layout and back.
// Bit j of word w of row r is the keep-flag of element (r, 32*w + j); padding bits are 0.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sparse_engine::cuda {

// mask: (rows, cols) bytes (torch.bool), element strides stride_row / stride_col.
// bits: contiguous int32 (rows, ceil(cols / 32)), every word written.
cudaError_t pack_mask(const uint8_t* mask, int64_t rows, int64_t cols, int64_t stride_row,
                      int64_t stride_col, int32_t* bits, cudaStream_t stream);

// bits: contiguous int32 (rows, ceil(cols / 32)). mask: contiguous bytes (rows, cols), 0 or 1.
cudaError_t unpack_mask(const int32_t* bits, int64_t rows, int64_t cols, uint8_t* mask,
                        cudaStream_t stream);

}  // namespace sparse_engine::cuda
