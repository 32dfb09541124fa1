#include "mask_bits.h"

#include <algorithm>

namespace sparse_engine::cpu {
namespace {

// Below this many words a parallel region costs more than the work it splits.
constexpr int64_t kParallelWords = 1 << 12;

// The element of a word's bit j as an all-ones or all-zero value of an element's size: masking by
// bitwise AND needs no branch, so the contiguous loops below vectorize.
template <typename word_t>
inline word_t keep_bits(uint32_t word, int j) {
  return static_cast<word_t>(word_t(0) - static_cast<word_t>((word >> j) & 1u));
}

// dst[j] = src[j] where kept, else 0, for the n <= 32 elements of one mask word.
template <typename word_t, bool kContiguous>
inline void masked_word(const word_t* src, int64_t stride_col, uint32_t word, int n, word_t* dst) {
  for (int j = 0; j < n; ++j) {
    dst[kContiguous ? j : j * stride_col] = src[kContiguous ? j : j * stride_col] & keep_bits<word_t>(word, j);
  }
}

// For each word of the (rows, cols) mask: fn(word, r, c0, n), in parallel for large masks.
template <typename Fn>
void for_each_word(const int32_t* bits, int64_t rows, int64_t cols, Fn fn) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t i = 0; i < total; ++i) {
    const int64_t c0 = (i % words_per_row) * 32;
    fn(static_cast<uint32_t>(bits[i]), i / words_per_row, c0, static_cast<int>(std::min<int64_t>(32, cols - c0)));
  }
}

template <typename word_t>
void apply_mask_kernel(word_t* data, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                       const int32_t* bits) {
  for_each_word(bits, rows, cols, [=](uint32_t word, int64_t r, int64_t c0, int n) {
    if (word == 0xffffffffu) return;  // all 32 kept (padding bits are 0, so never a partial last word)
    word_t* d = data + r * stride_row + c0 * stride_col;
    if (stride_col == 1) {
      masked_word<word_t, true>(d, 1, word, n, d);
    } else {
      masked_word<word_t, false>(d, stride_col, word, n, d);
    }
  });
}

template <typename word_t>
void masked_copy_kernel(const word_t* src, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                        const int32_t* bits, word_t* dst) {
  for_each_word(bits, rows, cols, [=](uint32_t word, int64_t r, int64_t c0, int n) {
    const word_t* s = src + r * stride_row + c0 * stride_col;
    word_t* d = dst + r * cols + c0;
    if (stride_col == 1) {
      masked_word<word_t, true>(s, 1, word, n, d);
    } else {
      for (int j = 0; j < n; ++j) d[j] = s[j * stride_col] & keep_bits<word_t>(word, j);
    }
  });
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
