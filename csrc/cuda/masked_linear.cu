// Masked GEMMs behind masked_linear on the GPU.
//
// One tiled kernel computes C = A @ B (+ bias) for all three products of the op. A, B and C are
// addressed through element strides, so non-contiguous inputs and the transposes of the backward
// pass need no copies:
//
//   forward      C = y  (M, N)   A = x    (M, K)   B = (W*M)^T (K, N)   mask on B: bit (n, k)
//   grad input   C = dx (M, K)   A = dy   (M, N)   B = W*M     (N, K)   mask on B: bit (k, n)
//   grad weight  C = dW (N, K)   A = dy^T (N, M)   B = x       (M, K)   mask on C: bit (m, n)
//
// The mask is applied while a W tile passes through registers on its way into shared memory, so
// W*M never exists in global memory; for dW it is applied in the epilogue, which writes pruned
// entries as exact zeros. fp16/bf16 run on tensor cores (wmma 16x16x16, fp32 accumulators);
// fp32 and fp64 run on CUDA cores in their own precision.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "masked_linear.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sparse_engine's CUDA kernels need sm_80 or newer (bf16 tensor cores): fix TORCH_CUDA_ARCH_LIST"
#endif

namespace sparse_engine::cuda {
namespace {

enum class MaskAt {
  kBTransposed,  // B[k][n] keeps bit (n, k): forward, B = (W*M)^T
  kB,            // B[k][n] keeps bit (k, n): grad input, B = W*M
  kC,            // C[m][n] keeps bit (m, n): grad weight
};

// C (m, n) = A (m, k) @ B (k, n) + bias, element (i, j) of X at x[i * x_s<row> + j * x_s<col>].
// T = void is the untyped form the public launchers fill in.
template <typename T>
struct GemmArgs {
  int64_t m, n, k;
  const T* a;
  int64_t a_sm, a_sk;
  const T* b;
  int64_t b_sk, b_sn;
  T* c;
  int64_t c_sm, c_sn;
  const T* bias;         // (n,) contiguous, or nullptr
  const int32_t* bits;   // keep-mask, contract layout
  int64_t bits_words;    // int32 words per mask row
};

template <typename T>
GemmArgs<T> typed(const GemmArgs<void>& g) {
  return {g.m, g.n, g.k,
          static_cast<const T*>(g.a), g.a_sm, g.a_sk,
          static_cast<const T*>(g.b), g.b_sk, g.b_sn,
          static_cast<T*>(g.c), g.c_sm, g.c_sn,
          static_cast<const T*>(g.bias), g.bits, g.bits_words};
}

// Conversions spelled as intrinsics: torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename T>
struct Num;

template <>
struct Num<float> {
  using Acc = float;
  __device__ static float to_acc(float v) { return v; }
  __device__ static float from_acc(float v) { return v; }
  __device__ static float zero() { return 0.0f; }
};

template <>
struct Num<double> {
  using Acc = double;
  __device__ static double to_acc(double v) { return v; }
  __device__ static double from_acc(double v) { return v; }
  __device__ static double zero() { return 0.0; }
};

template <>
struct Num<__half> {
  using Acc = float;
  __device__ static float to_acc(__half v) { return __half2float(v); }
  __device__ static __half from_acc(float v) { return __float2half_rn(v); }
  __device__ static __half zero() { return __ushort_as_half(0); }
};

template <>
struct Num<__nv_bfloat16> {
  using Acc = float;
  __device__ static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
  __device__ static __nv_bfloat16 zero() { return __ushort_as_bfloat16(0); }
};

__device__ __forceinline__ bool keep_bit(const int32_t* bits, int64_t words, int64_t row, int64_t col) {
  return (static_cast<uint32_t>(bits[row * words + col / 32]) >> (col % 32)) & 1u;
}

// Moves a ROWS x COLS tile of a strided matrix from global memory through registers into shared
// memory. load() and store() are split so that the global loads of the next tile are in flight
// while the current one is multiplied (double buffering by registers: cp.async would need
// aligned contiguous rows, which strided operands do not have). Elements outside the matrix, and
// pruned ones, become zeros, so edge tiles need no special case in the math; a pruned weight is
// never read from global memory.
//
// With rows_fast, thread t owns row t % ROWS and every (THREADS / ROWS)-th column from t / ROWS;
// otherwise column t % COLS and every (THREADS / COLS)-th row from t / COLS. Consecutive threads
// thus walk along the dimension of smaller stride when the caller picks rows_fast = (row stride
// < column stride), which keeps a warp's loads coalesced for either layout, and each element's
// address is a fixed step from the previous one.
template <typename T, int ROWS, int COLS, int THREADS>
class TileLoader {
 public:
  static_assert(THREADS % ROWS == 0 && THREADS % COLS == 0 && (ROWS * COLS) % THREADS == 0,
                "a tile must split evenly over the threads");

  // MASKED: element (r, c) keeps bit (r, c) of `bits`, or bit (c, r) if MASK_TRANSPOSED.
  template <bool MASKED, bool MASK_TRANSPOSED>
  __device__ void load(const T* src, int64_t stride_row, int64_t stride_col, int64_t rows,
                       int64_t cols, int64_t row0, int64_t col0, bool rows_fast,
                       const int32_t* bits, int64_t bits_words) {
    const Walk w = walk(rows_fast);
    const int64_t offset0 = (row0 + w.r) * stride_row + (col0 + w.c) * stride_col;
    const int64_t step = w.dr * stride_row + w.dc * stride_col;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t gr = row0 + w.r + i * w.dr;
      const int64_t gc = col0 + w.c + i * w.dc;
      bool keep = gr < rows && gc < cols;
      if (MASKED && keep) {
        keep = MASK_TRANSPOSED ? keep_bit(bits, bits_words, gc, gr) : keep_bit(bits, bits_words, gr, gc);
      }
      regs_[i] = keep ? src[offset0 + i * step] : Num<T>::zero();
    }
  }

  // Element (r, c) of the tile goes to dst[r * DST_ROW + c * DST_COL].
  template <int DST_ROW, int DST_COL>
  __device__ void store(T* dst, bool rows_fast) const {
    const Walk w = walk(rows_fast);
    T* const dst0 = dst + w.r * DST_ROW + w.c * DST_COL;
    const int step = w.dr * DST_ROW + w.dc * DST_COL;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) dst0[i * step] = regs_[i];
  }

 private:
  static constexpr int kPerThread = ROWS * COLS / THREADS;

  // This thread's first element (r, c) and the step (dr, dc) to its next one.
  struct Walk {
    int r, c, dr, dc;
  };

  __device__ static Walk walk(bool rows_fast) {
    const int t = static_cast<int>(threadIdx.x);
    if (rows_fast) return {t % ROWS, t / ROWS, 0, THREADS / ROWS};
    return {t / COLS, t % COLS, THREADS / COLS, 0};
  }

  T regs_[kPerThread];
};

// Loads the A tile (m0.., k0..) and the B tile (k0.., n0..) of one k step into registers.
template <MaskAt MASK, typename T, typename ATile, typename BTile>
__device__ __forceinline__ void load_tiles(const GemmArgs<T>& p, int64_t m0, int64_t n0, int64_t k0,
                                           bool a_rows_fast, bool b_rows_fast, ATile& a, BTile& b) {
  a.template load<false, false>(p.a, p.a_sm, p.a_sk, p.m, p.k, m0, k0, a_rows_fast, nullptr, 0);
  b.template load<MASK != MaskAt::kC, MASK == MaskAt::kBTransposed>(
      p.b, p.b_sk, p.b_sn, p.k, p.n, k0, n0, b_rows_fast, p.bits, p.bits_words);
}

template <typename T, MaskAt MASK>
__device__ __forceinline__ void store_output(const GemmArgs<T>& p, int64_t gm, int64_t gn,
                                             typename Num<T>::Acc v) {
  if (p.bias != nullptr) v += Num<T>::to_acc(p.bias[gn]);
  if (MASK == MaskAt::kC && !keep_bit(p.bits, p.bits_words, gm, gn)) v = 0;
  p.c[gm * p.c_sm + gn * p.c_sn] = Num<T>::from_acc(v);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core path (fp16, bf16): 128 x 128 block tile, 32 deep, 8 warps in a 2 x 4 grid; a warp
// owns 64 x 32 of C as 4 x 2 wmma 16x16x16 fragments with fp32 accumulators.
namespace tc {
constexpr int kBM = 128;
constexpr int kBN = 128;
constexpr int kBK = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kWarpsN = 4;
constexpr int kWM = 64;
constexpr int kWN = 32;
constexpr int kFragM = kWM / 16;
constexpr int kFragN = kWN / 16;
static_assert((kBM / kWM) * (kBN / kWN) == kWarps, "warp grid must cover the block tile");
// wmma needs ldm % 8 == 0 for 16-bit types and 32-byte aligned fragment pointers; the padding
// of 8 elements keeps both and moves consecutive rows onto different shared-memory banks.
constexpr int kPad = 8;
constexpr int kLdA = kBK + kPad;  // A stage stored [m][k]
constexpr int kLdB = kBN + kPad;  // B stage stored [k][n]
constexpr int kStageA = kBM * kLdA;
constexpr int kStageB = kBK * kLdB;
constexpr int kFragElems = 16 * 16;
}  // namespace tc

template <typename T, MaskAt MASK>
__global__ void __launch_bounds__(tc::kThreads) masked_gemm_tensor_core_kernel(const GemmArgs<T> p) {
  using namespace nvcuda;
  using namespace tc;
  // Two stages of A and B tiles; after the main loop the same bytes hold each warp's 16 x 16
  // fp32 fragment for the epilogue (wmma's register layout is opaque, so C goes through smem).
  constexpr size_t kTileBytes = 2 * (kStageA + kStageB) * sizeof(T);
  constexpr size_t kEpilogueBytes = kWarps * kFragElems * sizeof(float);
  __shared__ __align__(128) unsigned char smem[kTileBytes > kEpilogueBytes ? kTileBytes : kEpilogueBytes];
  T* const a_smem = reinterpret_cast<T*>(smem);
  T* const b_smem = a_smem + 2 * kStageA;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][kFragN];
#pragma unroll
  for (int i = 0; i < kFragM; ++i)
#pragma unroll
    for (int j = 0; j < kFragN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  TileLoader<T, kBM, kBK, kThreads> a_tile;
  TileLoader<T, kBK, kBN, kThreads> b_tile;
  const bool a_rows_fast = p.a_sm < p.a_sk;
  const bool b_rows_fast = p.b_sk < p.b_sn;
  const int64_t k_tiles = (p.k + kBK - 1) / kBK;

  if (k_tiles > 0) {
    load_tiles<MASK>(p, m0, n0, 0, a_rows_fast, b_rows_fast, a_tile, b_tile);
    a_tile.template store<kLdA, 1>(a_smem, a_rows_fast);
    b_tile.template store<kLdB, 1>(b_smem, b_rows_fast);
  }
  __syncthreads();

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int stage = static_cast<int>(kt & 1);
    const bool has_next = kt + 1 < k_tiles;
    if (has_next) load_tiles<MASK>(p, m0, n0, (kt + 1) * kBK, a_rows_fast, b_rows_fast, a_tile, b_tile);

    const T* a_stage = a_smem + stage * kStageA;
    const T* b_stage = b_smem + stage * kStageB;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_frag[kFragN];
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
        wmma::load_matrix_sync(a_frag[i], a_stage + (warp_m * kWM + i * 16) * kLdA + kk, kLdA);
#pragma unroll
      for (int j = 0; j < kFragN; ++j)
        wmma::load_matrix_sync(b_frag[j], b_stage + kk * kLdB + warp_n * kWN + j * 16, kLdB);
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) wmma::mma_sync(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
    }

    // The other stage was last read in iteration kt - 1, which ended in a barrier.
    if (has_next) {
      a_tile.template store<kLdA, 1>(a_smem + (stage ^ 1) * kStageA, a_rows_fast);
      b_tile.template store<kLdB, 1>(b_smem + (stage ^ 1) * kStageB, b_rows_fast);
    }
    __syncthreads();
  }

  float* const scratch = reinterpret_cast<float*>(smem) + warp * kFragElems;
#pragma unroll
  for (int i = 0; i < kFragM; ++i) {
#pragma unroll
    for (int j = 0; j < kFragN; ++j) {
      wmma::store_matrix_sync(scratch, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < kFragElems; e += 32) {
        const int64_t gm = m0 + warp_m * kWM + i * 16 + e / 16;
        const int64_t gn = n0 + warp_n * kWN + j * 16 + e % 16;
        if (gm < p.m && gn < p.n) store_output<T, MASK>(p, gm, gn, scratch[e]);
      }
      __syncwarp();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// CUDA-core path (fp32, fp64): BM x BN block tile, BK deep; each thread owns TM x TN outputs at
// rows tm + i * (BM / TM) and columns tn + j * (BN / TN). That strided ownership makes a warp's
// shared-memory reads of B consecutive (no bank conflicts), its reads of A broadcasts, and its
// stores of C coalesced.
template <typename T, MaskAt MASK, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__((BM / TM) * (BN / TN)) masked_gemm_simt_kernel(const GemmArgs<T> p) {
  using Acc = typename Num<T>::Acc;
  constexpr int kThreads = (BM / TM) * (BN / TN);
  constexpr int kThreadsN = BN / TN;
  constexpr int kRowStep = BM / TM;
  // A is stored transposed, [k][m], so one k step reads a thread's TM values from one row.
  // The padding spreads the transposing stores over the banks.
  constexpr int kPad = 4;
  constexpr int kLdA = BM + kPad;
  constexpr int kLdB = BN + kPad;
  __shared__ T a_smem[2][BK][kLdA];
  __shared__ T b_smem[2][BK][kLdB];

  const int tn = threadIdx.x % kThreadsN;
  const int tm = threadIdx.x / kThreadsN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;

  Acc acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = Acc(0);

  TileLoader<T, BM, BK, kThreads> a_tile;
  TileLoader<T, BK, BN, kThreads> b_tile;
  const bool a_rows_fast = p.a_sm < p.a_sk;
  const bool b_rows_fast = p.b_sk < p.b_sn;
  const int64_t k_tiles = (p.k + BK - 1) / BK;

  if (k_tiles > 0) {
    load_tiles<MASK>(p, m0, n0, 0, a_rows_fast, b_rows_fast, a_tile, b_tile);
    a_tile.template store<1, kLdA>(&a_smem[0][0][0], a_rows_fast);
    b_tile.template store<kLdB, 1>(&b_smem[0][0][0], b_rows_fast);
  }
  __syncthreads();

  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    const int stage = static_cast<int>(kt & 1);
    const bool has_next = kt + 1 < k_tiles;
    if (has_next) load_tiles<MASK>(p, m0, n0, (kt + 1) * BK, a_rows_fast, b_rows_fast, a_tile, b_tile);

#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      Acc a[TM];
      Acc b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = Num<T>::to_acc(a_smem[stage][kk][tm + i * kRowStep]);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Num<T>::to_acc(b_smem[stage][kk][tn + j * kThreadsN]);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }

    // The other stage was last read in iteration kt - 1, which ended in a barrier.
    if (has_next) {
      a_tile.template store<1, kLdA>(&a_smem[stage ^ 1][0][0], a_rows_fast);
      b_tile.template store<kLdB, 1>(&b_smem[stage ^ 1][0][0], b_rows_fast);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t gm = m0 + tm + i * kRowStep;
      const int64_t gn = n0 + tn + j * kThreadsN;
      if (gm < p.m && gn < p.n) store_output<T, MASK>(p, gm, gn, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
template <int BM, int BN, typename Kernel, typename Args>
cudaError_t launch(Kernel kernel, int threads, const Args& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  const int64_t grid_m = (p.m + BM - 1) / BM;
  const int64_t grid_n = (p.n + BN - 1) / BN;
  if (grid_m > 0x7fffffff || grid_n > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n)), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <MaskAt MASK>
cudaError_t masked_gemm(DType dtype, const GemmArgs<void>& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return launch<tc::kBM, tc::kBN>(masked_gemm_tensor_core_kernel<__half, MASK>, tc::kThreads,
                                      typed<__half>(args), stream);
    case DType::kBFloat16:
      return launch<tc::kBM, tc::kBN>(masked_gemm_tensor_core_kernel<__nv_bfloat16, MASK>, tc::kThreads,
                                      typed<__nv_bfloat16>(args), stream);
    case DType::kFloat32:
      return launch<128, 128>(masked_gemm_simt_kernel<float, MASK, 128, 128, 8, 8, 8>, 256,
                              typed<float>(args), stream);
    case DType::kFloat64:
      // Twice the bytes per element: half the tile edge keeps registers and smem in budget.
      return launch<64, 64>(masked_gemm_simt_kernel<double, MASK, 64, 64, 8, 4, 4>, 256,
                            typed<double>(args), stream);
  }
  return cudaErrorInvalidValue;
}

int64_t mask_words(int64_t cols) { return (cols + 31) / 32; }

}  // namespace

cudaError_t masked_linear_fwd(DType dtype, MatrixRef x, MatrixRef weight, const int32_t* mask_bits,
                              const void* bias, void* y, int64_t M, int64_t N, int64_t K,
                              cudaStream_t stream) {
  const GemmArgs<void> args{M, N, K,
                            x.data, x.stride_row, x.stride_col,
                            weight.data, weight.stride_col, weight.stride_row,
                            y, N, 1,
                            bias, mask_bits, mask_words(K)};
  return masked_gemm<MaskAt::kBTransposed>(dtype, args, stream);
}

cudaError_t masked_linear_bwd_input(DType dtype, MatrixRef dy, MatrixRef weight,
                                    const int32_t* mask_bits, void* dx, int64_t M, int64_t N,
                                    int64_t K, cudaStream_t stream) {
  const GemmArgs<void> args{M, K, N,
                            dy.data, dy.stride_row, dy.stride_col,
                            weight.data, weight.stride_row, weight.stride_col,
                            dx, K, 1,
                            nullptr, mask_bits, mask_words(K)};
  return masked_gemm<MaskAt::kB>(dtype, args, stream);
}

cudaError_t masked_linear_bwd_weight(DType dtype, MatrixRef dy, MatrixRef x,
                                     const int32_t* mask_bits, void* dw, int64_t M, int64_t N,
                                     int64_t K, cudaStream_t stream) {
  const GemmArgs<void> args{N, K, M,
                            dy.data, dy.stride_col, dy.stride_row,
                            x.data, x.stride_row, x.stride_col,
                            dw, K, 1,
                            nullptr, mask_bits, mask_words(K)};
  return masked_gemm<MaskAt::kC>(dtype, args, stream);
}

}  // namespace sparse_engine::cuda
