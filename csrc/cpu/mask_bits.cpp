#include "mask_bits.h"

#include <algorithm>

namespace sparse_engine::cpu {
namespace {

// Below this many words a parallel region costs more than the work it splits.
constexpr int64_t kParallelWords = 1 << 12;
// Words per task of the elementwise loops: each task runs one call of a (SIMD-cloned) worker.
constexpr int64_t kChunkWords = 1 << 10;

// x86-64 builds target the baseline ISA (SSE2), which has no per-lane variable shift: the loops
// below would run one element at a time. The elementwise workers are therefore also compiled for
// AVX2 and picked at load time (GCC/Clang function multi-versioning), about 4x faster there.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSE_ENGINE_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPARSE_ENGINE_SIMD_CLONES
#endif

// The element of a word's bit j as an all-ones or all-zero value of an element's size: masking by
// bitwise AND needs no branch, so the contiguous loops below vectorize.
template <typename word_t>
inline word_t keep_bits(uint32_t word, int j) {
  return static_cast<word_t>(word_t(0) - static_cast<word_t>((word >> j) & 1u));
}

// Calls fn(i0, i1) on ranges of the flat word index [0, total), in parallel for large masks, so a
// single long row is split over threads as well.
template <typename Fn>
void for_word_ranges(int64_t total, Fn fn) {
  const int64_t chunks = (total + kChunkWords - 1) / kChunkWords;
#pragma omp parallel for schedule(static) if (total >= kParallelWords)
  for (int64_t c = 0; c < chunks; ++c) fn(c * kChunkWords, std::min(total, (c + 1) * kChunkWords));
}

// Words [i0, i1) of a (rows, cols) mask with words_per_row words a row: zero the pruned elements
// of data in place (kept ones are not written), or copy src to the contiguous dst with the pruned
// elements zeroed. Always inlined into the cloned workers below, so they get the workers' ISA.
template <typename word_t>
__attribute__((always_inline)) inline void apply_mask_words(word_t* data, int64_t cols, int64_t words_per_row,
                                                            int64_t stride_row, int64_t stride_col,
                                                            const int32_t* bits, int64_t i0, int64_t i1) {
  // Row and word of i, stepped along (a 64-bit division per word would cost more than the masking).
  int64_t r = i0 / words_per_row, w = i0 % words_per_row;
  for (int64_t i = i0; i < i1; ++i, w = (w + 1 == words_per_row) ? 0 : w + 1, r += (w == 0)) {
    const uint32_t word = static_cast<uint32_t>(bits[i]);
    if (word == 0xffffffffu) continue;  // all 32 kept (padding bits are 0, so never a partial last word)
    const int64_t c0 = w * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    word_t* d = data + r * stride_row + c0 * stride_col;
    if (stride_col == 1 && n == 32 && sizeof(word_t) >= 4) {
      // A whole word: constant bit positions, as in masked_copy_words (AVX2 tests 8 lanes at once).
      for (int j = 0; j < 32; ++j) d[j] &= static_cast<word_t>(word_t(0) - word_t((word & (1u << j)) != 0));
    } else if (stride_col == 1) {
      for (int j = 0; j < n; ++j) d[j] &= keep_bits<word_t>(word, j);
    } else {
      for (int j = 0; j < n; ++j) d[j * stride_col] &= keep_bits<word_t>(word, j);
    }
  }
}

// masked_copy_words reads the words of a block of columns of a larger mask: word w of row r is
// bits[r * bits_stride_row + w], and it writes row r of dst at dst + r * dst_stride_row.
template <typename word_t>
__attribute__((always_inline)) inline void masked_copy_words(const word_t* src, int64_t cols, int64_t words_per_row,
                                                             int64_t stride_row, int64_t stride_col,
                                                             const int32_t* bits, int64_t bits_stride_row,
                                                             word_t* dst, int64_t dst_stride_row, int64_t i0,
                                                             int64_t i1) {
  int64_t r = i0 / words_per_row, w = i0 % words_per_row;  // stepped along, as in apply_mask_words
  for (int64_t i = i0; i < i1; ++i, w = (w + 1 == words_per_row) ? 0 : w + 1, r += (w == 0)) {
    const uint32_t word = static_cast<uint32_t>(bits[r * bits_stride_row + w]);
    const int64_t c0 = w * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const word_t* s = src + r * stride_row + c0 * stride_col;
    word_t* d = dst + r * dst_stride_row + c0;
    if (stride_col == 1 && n == 32 && sizeof(word_t) >= 4) {
      // A whole word, a fixed trip count with constant bit positions: AVX2 compares 8 lanes at once.
      for (int j = 0; j < 32; ++j) d[j] = s[j] & static_cast<word_t>(word_t(0) - word_t((word & (1u << j)) != 0));
    } else if (stride_col == 1) {
      for (int j = 0; j < n; ++j) d[j] = s[j] & keep_bits<word_t>(word, j);
    } else {
      for (int j = 0; j < n; ++j) d[j] = s[j * stride_col] & keep_bits<word_t>(word, j);
    }
  }
}

// Words [i0, i1) of a (rows, cols) mask: the OR of the pruned elements of data with the sign bit
// cleared (0 when all of them are +0 or -0). Contiguous whole words take a fixed trip count with
// constant bit positions, so AVX2 tests 8 lanes at once, as in masked_copy_words.
template <typename word_t>
__attribute__((always_inline)) inline word_t pruned_bits_words(const word_t* data, int64_t cols, int64_t words_per_row,
                                                               int64_t stride_row, int64_t stride_col,
                                                               const int32_t* bits, int64_t i0, int64_t i1) {
  constexpr word_t magnitude = static_cast<word_t>(~(word_t(1) << (sizeof(word_t) * 8 - 1)));
  // One accumulator per bit position: the whole-word loop ORs vector into vector, with no
  // horizontal reduction per word; they are reduced once at the end.
  word_t lanes[32] = {};
  word_t acc = 0;
  int64_t r = i0 / words_per_row, w = i0 % words_per_row;  // stepped along, as in apply_mask_words
  for (int64_t i = i0; i < i1; ++i, w = (w + 1 == words_per_row) ? 0 : w + 1, r += (w == 0)) {
    const uint32_t word = static_cast<uint32_t>(bits[i]);
    if (word == 0xffffffffu) continue;
    const int64_t c0 = w * 32;
    const int n = static_cast<int>(std::min<int64_t>(32, cols - c0));
    const word_t* s = data + r * stride_row + c0 * stride_col;
    if (stride_col == 1 && n == 32) {
      for (int j = 0; j < 32; ++j) lanes[j] |= s[j] & static_cast<word_t>(word_t(0) - word_t((word & (1u << j)) == 0));
    } else {
      for (int j = 0; j < n; ++j) acc |= s[j * stride_col] & static_cast<word_t>(~keep_bits<word_t>(word, j));
    }
  }
  for (int j = 0; j < 32; ++j) acc |= lanes[j];
  return acc & magnitude;
}

// One non-template, SIMD-cloned worker per element size.
#define SPARSE_ENGINE_ELEMENTWISE_WORKERS(word_t, suffix)                                                         \
  SPARSE_ENGINE_SIMD_CLONES void apply_mask_words_##suffix(word_t* data, int64_t cols, int64_t words_per_row,     \
                                                           int64_t stride_row, int64_t stride_col,                \
                                                           const int32_t* bits, int64_t i0, int64_t i1) {         \
    apply_mask_words<word_t>(data, cols, words_per_row, stride_row, stride_col, bits, i0, i1);                    \
  }                                                                                                               \
  SPARSE_ENGINE_SIMD_CLONES void masked_copy_words_##suffix(const word_t* src, int64_t cols, int64_t words_per_row, \
                                                            int64_t stride_row, int64_t stride_col,               \
                                                            const int32_t* bits, int64_t bits_stride_row,         \
                                                            word_t* dst, int64_t dst_stride_row, int64_t i0,      \
                                                            int64_t i1) {                                         \
    masked_copy_words<word_t>(src, cols, words_per_row, stride_row, stride_col, bits, bits_stride_row, dst,       \
                              dst_stride_row, i0, i1);                                                            \
  }                                                                                                               \
  SPARSE_ENGINE_SIMD_CLONES word_t pruned_bits_words_##suffix(const word_t* data, int64_t cols, int64_t words_per_row, \
                                                              int64_t stride_row, int64_t stride_col,             \
                                                              const int32_t* bits, int64_t i0, int64_t i1) {      \
    return pruned_bits_words<word_t>(data, cols, words_per_row, stride_row, stride_col, bits, i0, i1);            \
  }

SPARSE_ENGINE_ELEMENTWISE_WORKERS(uint8_t, 1)
SPARSE_ENGINE_ELEMENTWISE_WORKERS(uint16_t, 2)
SPARSE_ENGINE_ELEMENTWISE_WORKERS(uint32_t, 4)
SPARSE_ENGINE_ELEMENTWISE_WORKERS(uint64_t, 8)
#undef SPARSE_ENGINE_ELEMENTWISE_WORKERS

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

#define SPARSE_ENGINE_FOR_ELEMENT_SIZE(elem_size, CALL) \
  switch (elem_size) {                                  \
    case 1: CALL(uint8_t, 1); break;                    \
    case 2: CALL(uint16_t, 2); break;                   \
    case 4: CALL(uint32_t, 4); break;                   \
    case 8: CALL(uint64_t, 8); break;                   \
    default: break; /* the caller checks elem_size */   \
  }

void apply_mask(void* data, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                const int32_t* bits) {
  // Zeroing is a store of zero bytes, so only the element size matters, not the dtype.
  const int64_t words_per_row = (cols + 31) / 32;
#define CALL(word_t, suffix)                                                                                 \
  for_word_ranges(rows * words_per_row, [=](int64_t i0, int64_t i1) {                                       \
    apply_mask_words_##suffix(static_cast<word_t*>(data), cols, words_per_row, stride_row, stride_col, bits, \
                              i0, i1);                                                                      \
  })
  SPARSE_ENGINE_FOR_ELEMENT_SIZE(elem_size, CALL)
#undef CALL
}

void masked_copy(const void* src, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                 int64_t stride_col, const int32_t* bits, void* dst) {
  masked_copy_block(src, elem_size, rows, cols, stride_row, stride_col, bits, (cols + 31) / 32, dst, cols);
}

void masked_copy_block(const void* src, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                       int64_t stride_col, const int32_t* bits, int64_t bits_stride_row, void* dst,
                       int64_t dst_stride_row) {
  const int64_t words_per_row = (cols + 31) / 32;
#define CALL(word_t, suffix)                                                                                    \
  for_word_ranges(rows * words_per_row, [=](int64_t i0, int64_t i1) {                                          \
    masked_copy_words_##suffix(static_cast<const word_t*>(src), cols, words_per_row, stride_row, stride_col,    \
                               bits, bits_stride_row, static_cast<word_t*>(dst), dst_stride_row, i0, i1);       \
  })
  SPARSE_ENGINE_FOR_ELEMENT_SIZE(elem_size, CALL)
#undef CALL
}
#undef SPARSE_ENGINE_FOR_ELEMENT_SIZE

bool pruned_are_zero(const void* data, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                     int64_t stride_col, const int32_t* bits) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * words_per_row;
  const int64_t chunks = (total + kChunkWords - 1) / kChunkWords;
  // Chunks in parallel for large masks, each skipped once any chunk has found a non-zero.
  bool zero = true;
#define CHECK_CHUNKS(word_t, suffix)                                                                             \
  _Pragma("omp parallel for schedule(static) if (total >= kParallelWords)")                                    \
  for (int64_t c = 0; c < chunks; ++c) {                                                                        \
    bool still;                                                                                                 \
    _Pragma("omp atomic read") still = zero;                                                                    \
    if (!still) continue;                                                                                       \
    if (pruned_bits_words_##suffix(static_cast<const word_t*>(data), cols, words_per_row, stride_row, stride_col, \
                                   bits, c * kChunkWords, std::min(total, (c + 1) * kChunkWords)) != 0) {       \
      _Pragma("omp atomic write") zero = false;                                                                 \
    }                                                                                                           \
  }
  switch (elem_size) {
    case 2: CHECK_CHUNKS(uint16_t, 2); break;
    case 4: CHECK_CHUNKS(uint32_t, 4); break;
    case 8: CHECK_CHUNKS(uint64_t, 8); break;
    default: return false; /* the caller checks elem_size */
  }
#undef CHECK_CHUNKS
  return zero;
}

}  // namespace sparse_engine::cpu
