// Bit packing of masks on the CPU, in the contract's layout: bit j (LSB first) of word w of row r
// is the keep-flag of element (r, 32*w + j); padding bits past `cols` are 0.
// Torch-free, so the CMake build compiles it without finding Torch.
#pragma once

#include <cstdint>

namespace sparse_engine::cpu {

// mask: (rows, cols) bytes (torch.bool, nonzero = kept) at element strides stride_row /
// stride_col. bits: contiguous int32 (rows, ceil(cols / 32)), every word written.
void pack_mask(const uint8_t* mask, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
               int32_t* bits);

// bits: contiguous int32 (rows, ceil(cols / 32)). mask: contiguous bytes (rows, cols), 0 or 1.
void unpack_mask(const int32_t* bits, int64_t rows, int64_t cols, uint8_t* mask);

// Sets the pruned elements of a (rows, cols) tensor to all-zero bytes (+0 for every floating
// dtype), in place: element (r, c) lives at data + (r * stride_row + c * stride_col) * elem_size.
// Words whose 32 elements are all kept are not touched. elem_size is 1, 2, 4 or 8.
void apply_mask(void* data, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row, int64_t stride_col,
                const int32_t* bits);

// dst (contiguous (rows, cols)) = src * mask: kept elements copied from src (element strides
// stride_row / stride_col), pruned ones all-zero bytes. elem_size is 1, 2, 4 or 8.
void masked_copy(const void* src, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                 int64_t stride_col, const int32_t* bits, void* dst);

// masked_copy of a block of columns [c0, c0 + cols) of a larger matrix, c0 a multiple of 32: src
// and bits point at the block's first element and word, a row of the mask is bits_stride_row words
// apart, and row r of the block goes to dst + r * dst_stride_row (elements).
void masked_copy_block(const void* src, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                       int64_t stride_col, const int32_t* bits, int64_t bits_stride_row, void* dst,
                       int64_t dst_stride_row);

// True when every pruned element of a (rows, cols) floating-point tensor is +0 or -0 (read only;
// the chunks of 1024 mask words after the one that finds another value are skipped): element (r, c) at data + (r * stride_row + c * stride_col)
// * elem_size, elem_size 2, 4 or 8 (float16/bfloat16, float32, float64: the sign bit is ignored).
bool pruned_are_zero(const void* data, int64_t elem_size, int64_t rows, int64_t cols, int64_t stride_row,
                     int64_t stride_col, const int32_t* bits);

}  // namespace sparse_engine::cpu
