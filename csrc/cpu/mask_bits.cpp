#include "mask_bits.h"

#include <algorithm>

namespace sparse_engine::cpu {
namespace {

// Below this many words a parallel region costs more than the work it splits.
constexpr int64_t kParallelWords = 1 << 12;

template <typename word_t>
void apply_mask_kernel(word_t* data, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                       const int32_t* bits) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]);
    if (word == 0xffffffffu) continue;  // all 32 kept (padding bits are 0, so never a partial last word)
    const int64_t r = i / words_per_row;
    const int64_t c0 = (i % words_per_row) * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    word_t* dst = data + r * stride_row + c0 * stride_col;
    for (int j = 0; j < n; ++j) {
      if (!((word >> j) & 1u)) dst[j * stride_col] = word_t(0);
    }
  }
}

template <typename word_t>
void masked_copy_kernel(const word_t* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                        const int32_t* bits, word_t* dst) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const uint32_t word = static_cast<uint32_t>(bits[i]);
    const int64_t r = i / words_per_row;
    const int64_t c0 = (i % words_per_row) * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const word_t* s = src + r * stride_row + c0 * stride_col;
    word_t* d = dst + r * cols + c0;
    for (int j = 0; j < n; ++j) d[j] = ((word >> j) & 1u) ? s[j * stride_col] : word_t(0);
  }
}

}  // namespace

void pack_mask(const uint8_t* mask, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
               int32_t* bits) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
  // One flat loop over all words, so a single long row is split over threads as well.
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const int64_t r = i / words_per_row;
    const int64_t c0 = (i % words_per_row) * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const uint8_t* src = mask + r * stride_row + c0 * stride_col;
    uint32_t word = 0;
    for (int j = 0; j < n; ++j) word |= static_cast<uint32_t>(src[j * stride_col] != 0) << j;
    bits[i] = static_cast<int32_t>(word);
  }
}

void unpack_mask(const int32_t* bits, int64_t rows, int64_t cols, uint8_t* mask) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const int64_t r = i / words_per_row;
    const int64_t c0 = (i % words_per_row) * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const uint32_t word = static_cast<uint32_t>(bits[i]);
    uint8_t* dst = mask + r * cols + c0;
    for (int j = 0; j < n; ++j) dst[j] = static_cast<uint8_t>((word >> j) & 1u);
  }
}

void apply_mask(void* data, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                const int32_t* bits) {
  // Zeroing is a store of zero bytes, so only the element size matters, not the dtype.
  switch (elem_size) {
    case 1: return apply_mask_kernel(static_cast<uint8_t*>(data), rows, cols, stride_row, stride_col, bits);
    case 2: return apply_mask_kernel(static_cast<uint16_t*>(data), rows, cols, stride_row, stride_col, bits);
    case 4: return apply_mask_kernel(static_cast<uint32_t*>(data), rows, cols, stride_row, stride_col, bits);
    case 8: return apply_mask_kernel(static_cast<uint64_t*>(data), rows, cols, stride_row, stride_col, bits);
    default: return;  // the caller checks elem_size
  }
}

void masked_copy(const void* src, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                 int64_t stride_col, const int32_t* bits, void* dst) {
  switch (elem_size) {
    case 1: return masked_copy_kernel(static_cast<const uint8_t*>(src), rows, cols, stride_row, stride_col, bits,
                                      static_cast<uint8_t*>(dst));
    case 2: return masked_copy_kernel(static_cast<const uint16_t*>(src), rows, cols, stride_row, stride_col, bits,
                                      static_cast<uint16_t*>(dst));
    case 4: return masked_copy_kernel(static_cast<const uint32_t*>(src), rows, cols, stride_row, stride_col, bits,
                                      static_cast<uint32_t*>(dst));
    case 8: return masked_copy_kernel(static_cast<const uint64_t*>(src), rows, cols, stride_row, stride_col, bits,
                                      static_cast<uint64_t*>(dst));
    default: return;  // the caller checks elem_size
  }
}

}  // namespace sparse_engine::cpu
