// masked_linear on the CPU: W*M is expanded a block at a time into a small temporary that stays in
// cache, and multiplied with ATen's BLAS matmul, so peak extra memory is one block, never a copy of W.
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

// Bytes of one expanded block of W*M. Measured on a 2-core AMD EPYC with MKL: blocks that fit in
// L2 (128 KiB) made the matmuls so small that they lost more than the cache saved (1.25-2x slower
// fwd+bwd at 300x784 and 1024x4096); 4 MiB blocks are as fast as one block for the whole W.
constexpr int64_t kBlockBytes = 4 * 1024 * 1024;
// Below this many mask words (32 elements each) a parallel region costs more than it saves.
constexpr int64_t kParallelWords = 1 << 10;

// Rows of W per block (forward, weight gradient) for rows of `cols` elements of `elem` bytes.
int64_t block_rows(int64_t cols, int64_t elem, int64_t rows) {
  return std::min(rows, std::max<int64_t>(8, kBlockBytes / std::max<int64_t>(1, cols * elem)));
}

// fp16/bf16 weights expanded to fp32 (their opmath type); the same dtype goes through masked_copy.
template <typename scalar_t, typename out_t>
void masked_block_convert(const scalar_t* w, int64_t stride_row, int64_t stride_col, const int32_t* bits,
                          int64_t bits_stride_row, int64_t rows, int64_t cols, out_t* out) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const int64_t r = i / words_per_row;
    const int64_t c0 = (i % words_per_row) * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const uint32_t word = static_cast<uint32_t>(bits[r * bits_stride_row + c0 / 32]);
    const scalar_t* src = w + r * stride_row + c0 * stride_col;
    out_t* dst = out + r * cols + c0;
    for (int j = 0; j < n; ++j) {
      dst[j] = ((word >> j) & 1u) ? static_cast<out_t>(src[j * stride_col]) : out_t(0);
    }
  }
}

// Fills `out`, a contiguous (rows, cols) tensor of the weight's opmath dtype, with the block of
// W*M at rows [row0, row0 + rows) and columns [col0, col0 + cols), col0 a multiple of 32.
void masked_block(const at::Tensor& weight, const at::Tensor& mask_bits, int64_t row0, int64_t col0,
                  at::Tensor& out) {
  const int64_t words_per_row = mask_bits.size(1);
  const int32_t* bits = mask_bits.const_data_ptr<int32_t>() + row0 * words_per_row + col0 / 32;
  const int64_t offset = row0 * weight.stride(0) + col0 * weight.stride(1);
  if (out.scalar_type() == weight.scalar_type()) {
    masked_copy_block(static_cast<const char*>(weight.const_data_ptr()) + offset * weight.element_size(),
                      weight.element_size(), out.size(0), out.size(1), weight.stride(0), weight.stride(1), bits,
                      words_per_row, out.data_ptr(), out.size(1));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "masked_block", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    masked_block_convert<scalar_t, opmath_t>(weight.const_data_ptr<scalar_t>() + offset, weight.stride(0),
                                             weight.stride(1), bits, words_per_row, out.size(0), out.size(1),
                                             out.data_ptr<opmath_t>());
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
  const int64_t chunk = block_rows(K, y.element_size(), N);
  at::Tensor w_buffer = at::empty({chunk, K}, options);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::Tensor w_rows = w_buffer.narrow(0, 0, rows);
    masked_block(weight, mask_bits, n0, 0, w_rows);
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

  // Blocks of columns of W*M (a multiple of 32 wide, so they start on a mask word): each column
  // block of dX is written once by one matmul, with no accumulation over blocks.
  at::Tensor dx = at::empty({M, K}, options);
  const int64_t per_column = std::max<int64_t>(1, N * dx.element_size());
  const int64_t width = std::min(K, std::max<int64_t>(32, kBlockBytes / per_column / 32 * 32));
  at::Tensor w_buffer = at::empty({N, width}, options);
  for (int64_t k0 = 0; k0 < K; k0 += width) {
    const int64_t cols = std::min(width, K - k0);
    at::Tensor w_cols = w_buffer.narrow(1, 0, cols);
    if (cols < width) w_cols = at::empty({N, cols}, options);
    masked_block(weight, mask_bits, 0, k0, w_cols);
    at::Tensor dx_cols = dx.narrow(1, k0, cols);
    at::mm_out(dx_cols, dy_op, w_cols);
  }
  return dx.to(dy.scalar_type());
}

at::Tensor masked_linear_bwd_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask_bits) {
  const int64_t N = dy.size(1);
  const int64_t K = x.size(1);
  const auto opmath = at::toOpMathType(x.scalar_type());
  const at::Tensor dy_t = dy.to(opmath).t();
  const at::Tensor x_op = x.to(opmath);
  at::Tensor dw = at::empty({N, K}, x.options().dtype(opmath));
  // Blocks of rows, each masked right after its matmul.
  const int64_t chunk = block_rows(K, dw.element_size(), N);
  const int64_t words_per_row = mask_bits.size(1);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::Tensor dw_rows = dw.narrow(0, n0, rows);
    at::mm_out(dw_rows, dy_t.narrow(0, n0, rows), x_op);
    apply_mask(dw_rows.data_ptr(), dw.element_size(), rows, K, dw.stride(0), dw.stride(1),
               mask_bits.const_data_ptr<int32_t>() + n0 * words_per_row);
  }
  return dw.to(x.scalar_type());
}

}  // namespace sparse_engine::cpu
