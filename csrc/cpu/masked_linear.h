// CPU implementation of masked_linear's three products (see the contract for the semantics).
// Arguments are checked by the caller (csrc/bindings.cpp): 2-D x/dy/weight of one floating dtype
// (float32, float64, float16, bfloat16), any strides; mask_bits contiguous int32 (N, ceil(K/32)).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace sparse_engine::cpu {

// y (M, N) = x (M, K) @ (W*M)^T + bias, dtype of x.
at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_bits,
                             const std::optional<at::Tensor>& bias);

// dx (M, K) = dy (M, N) @ (W*M), dtype of dy.
at::Tensor masked_linear_bwd_input(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& mask_bits);

// dw (N, K) = (dy^T @ x) * M, dtype of x; pruned entries are exact zeros.
at::Tensor masked_linear_bwd_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask_bits);

}  // namespace sparse_engine::cpu
