// masked_linear on the CPU: W*M is expanded a chunk of rows at a time into a small temporary and
// multiplied with ATen's BLAS matmul, so peak extra memory is kRowChunk x K, never a copy of W.
// fp16/bf16 inputs are computed in fp32 (their opmath type): the products accumulate over row
// chunks, and summing partial results in 16 bits would lose precision.
#include "masked_linear.h"

#include "mask_bits.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>

namespace sparse_engine::cpu {
namespace {

// Large enough that each matmul runs near BLAS speed, small beside any W worth pruning.
constexpr int64_t kRowChunk = 256;
// Below this many mask words (32 elements each) a parallel region costs more than it saves.
constexpr int64_t kParallelWords = 1 << 10;

template <typename scalar_t, typename out_t>
void masked_rows_kernel(const scalar_t* w, int64_t stride_row, int64_t stride_col, const int32_t* bits,
                        int64_t words_per_row, int64_t rows, int64_t cols, out_t* out) {
  const int64_t total = rows * words_per_row;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const int64_t r = i / words_per_row;
    const int64_t c0 = (i % words_per_row) * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const uint32_t word = static_cast<uint32_t>(bits[i]);
    const scalar_t* src = w + r * stride_row + c0 * stride_col;
    out_t* dst = out + r * cols + c0;
    for (int j = 0; j < n; ++j) {
      dst[j] = ((word >> j) & 1u) ? static_cast<out_t>(src[j * stride_col]) : out_t(0);
    }
  }
}

// Fills `out`, a contiguous (rows, K) tensor of weight's opmath dtype, with rows
// [row0, row0 + rows) of W*M.
void masked_rows(const at::Tensor& weight, const at::Tensor& mask_bits, int64_t row0, at::Tensor& out) {
  const int64_t words_per_row = mask_bits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_rows", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    masked_rows_kernel<scalar_t, opmath_t>(weight.const_data_ptr<scalar_t>() + row0 * weight.stride(0),
                                           weight.stride(0), weight.stride(1),
                                           mask_bits.const_data_ptr<int32_t>() + row0 * words_per_row,
                                           words_per_row, out.size(0), out.size(1), out.data_ptr<opmath_t>());
  });
}

}  // namespace

at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_bits,
                             const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = weight.size(0);
  const auto opmath = at::toOpMathType(x.scalar_type());
  const auto options = x.options().dtype(opmath);
  const at::Tensor x_op = x.to(opmath);
  const at::Tensor bias_op = bias.has_value() ? bias->to(opmath) : at::Tensor();

  at::Tensor y = at::empty({M, N}, options);
  at::Tensor w_buffer = at::empty({std::min(kRowChunk, N), K}, options);
  for (int64_t n0 = 0; n0 < N; n0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, N - n0);
    at::Tensor w_rows = w_buffer.narrow(0, 0, rows);
    masked_rows(weight, mask_bits, n0, w_rows);
    // A column slice of row-major y is a valid BLAS output (leading dimension N): no copy.
    at::Tensor y_cols = y.narrow(1, n0, rows);
    if (bias_op.defined()) {
      at::addmm_out(y_cols, bias_op.narrow(0, n0, rows), x_op, w_rows.t());
    } else {
      at::mm_out(y_cols, x_op, w_rows.t());
    }
  }
  return y.to(x.scalar_type());
}

at::Tensor masked_linear_bwd_input(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& mask_bits) {
  const int64_t M = dy.size(0);
  const int64_t N = weight.size(0);
  const int64_t K = weight.size(1);
  const auto opmath = at::toOpMathType(dy.scalar_type());
  const auto options = dy.options().dtype(opmath);
  const at::Tensor dy_op = dy.to(opmath);

  at::Tensor dx = at::zeros({M, K}, options);
  at::Tensor w_buffer = at::empty({std::min(kRowChunk, N), K}, options);
  for (int64_t n0 = 0; n0 < N; n0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, N - n0);
    at::Tensor w_rows = w_buffer.narrow(0, 0, rows);
    masked_rows(weight, mask_bits, n0, w_rows);
    dx.addmm_(dy_op.narrow(1, n0, rows), w_rows);
  }
  return dx.to(dy.scalar_type());
}

at::Tensor masked_linear_bwd_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask_bits) {
  const int64_t N = dy.size(1);
  const int64_t K = x.size(1);
  const auto opmath = at::toOpMathType(x.scalar_type());
  at::Tensor dw = at::empty({N, K}, x.options().dtype(opmath));
  at::mm_out(dw, dy.to(opmath).t(), x.to(opmath));
  apply_mask(dw.data_ptr(), dw.element_size(), N, K, dw.stride(0), dw.stride(1), mask_bits.const_data_ptr<int32_t>());
  return dw.to(x.scalar_type());
}

}  // namespace sparse_engine::cpu
