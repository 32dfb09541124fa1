// Bit packing of masks on the GPU. See mask_bits.h for the layout.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mask_bits.h"

namespace sparse_engine::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
// Grid-stride loops cover the rest; this many blocks already fill any current GPU.
constexpr int64_t kMaxBlocks = 1 << 16;

// One warp per 32-bit word: lane j reads element 32*w + j and the ballot is the word, so a
// row-major mask is read with coalesced loads and each word is written once.
__global__ void pack_mask_kernel(const uint8_t* __restrict__ mask, int64_t rows, int64_t cols,
                                 int64_t stride_row, int64_t stride_col, int32_t* __restrict__ bits) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total_words = rows * words_per_row;
  const int lane = threadIdx.x % 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // `word` is the same for all lanes of a warp, so the loop exit is warp-uniform and every lane
  // reaches the ballot.
  for (int64_t word = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
       word < total_words; word += warp_stride) {
    const int64_t r = word / words_per_row;
    const int64_t c = (word % words_per_row) * 32 + lane;
    const bool keep = c < cols && mask[r * stride_row + c * stride_col] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) bits[word] = static_cast<int32_t>(ballot);
  }
}

__global__ void unpack_mask_kernel(const int32_t* __restrict__ bits, int64_t rows, int64_t cols,
                                   uint8_t* __restrict__ mask) {
  const int64_t words_per_row = (cols + 31) / 32;
  const int64_t total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t r = i / cols;
    const int64_t c = i % cols;
    const uint32_t word = static_cast<uint32_t>(bits[r * words_per_row + c / 32]);
    mask[i] = static_cast<uint8_t>((word >> (c % 32)) & 1u);
  }
}

}  // namespace

cudaError_t pack_mask(const uint8_t* mask, int64_t rows, int64_t cols, int64_t stride_row,
                      int64_t stride_col, int32_t* bits, cudaStream_t stream) {
  const int64_t total_words = rows * ((cols + 31) / 32);
  if (total_words == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (total_words + kWarpsPerBlock - 1) / kWarpsPerBlock);
  pack_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(mask, rows, cols, stride_row,
                                                                          stride_col, bits);
  return cudaGetLastError();
}

cudaError_t unpack_mask(const int32_t* bits, int64_t rows, int64_t cols, uint8_t* mask,
                        cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = std::min(kMaxBlocks, (total + kThreads - 1) / kThreads);
  unpack_mask_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(bits, rows, cols, mask);
  return cudaGetLastError();
}

}  // namespace sparse_engine::cuda
