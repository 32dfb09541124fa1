// Host launchers of the masked GEMMs behind masked_linear, for CUDA tensors.
//
// Shapes (contract): x (M, K), weight (N, K), mask_bits contiguous int32 (N, ceil(K / 32)),
// bias contiguous (N,) or nullptr, dy (M, N). Inputs take arbitrary element strides; outputs are
// contiguous and fully written. x, weight, bias, dy and the output share one dtype; fp16/bf16 run
// on tensor cores with fp32 accumulators, fp32 and fp64 on CUDA cores in their own precision.
// W*M never exists in global memory: the mask is applied to W tiles on their way into shared
// memory, or (dW) in the epilogue. Each launcher returns the launch's error, cudaSuccess if none.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace sparse_engine::cuda {

// A 2-D operand in global memory: element (i, j) lives at data[i * stride_row + j * stride_col].
struct MatrixRef {
  const void* data;
  int64_t stride_row;
  int64_t stride_col;
};

// y (M, N) = x @ (W*M)^T + bias
cudaError_t masked_linear_fwd(DType dtype, MatrixRef x, MatrixRef weight, const int32_t* mask_bits,
                              const void* bias, void* y, int64_t M, int64_t N, int64_t K,
                              cudaStream_t stream);

// dx (M, K) = dy @ (W*M)
cudaError_t masked_linear_bwd_input(DType dtype, MatrixRef dy, MatrixRef weight,
                                    const int32_t* mask_bits, void* dx, int64_t M, int64_t N,
                                    int64_t K, cudaStream_t stream);

// dw (N, K) = (dy^T @ x) * M, pruned entries exact zeros
cudaError_t masked_linear_bwd_weight(DType dtype, MatrixRef dy, MatrixRef x,
                                     const int32_t* mask_bits, void* dw, int64_t M, int64_t N,
                                     int64_t K, cudaStream_t stream);

}  // namespace sparse_engine::cuda
