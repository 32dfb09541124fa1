// topk_mask on the GPU: a radix select over every score tensor of a call at once.
//
// Keys. A score's raw bits map to an unsigned key whose integer order is the score order: -0.0 is
// first made +0.0, then negative scores have all bits flipped and the others only the sign bit;
// for largest=False the key is inverted. fp16/bf16 scores get 16-bit keys of their own bits
// (ordering them is the same as ordering their exact float32 values): 2 passes, fp32 3.
//
// Work is cut into tiles of kTileWords mask words (4096 scores for rows of >= 32) of one tensor.
// The tensors are taken in (group, tensor index) order, so each group's tiles are contiguous and
// in the tie-break order. A persistent grid gives each block a contiguous run of tiles; one
// launch per pass covers all tensors of all groups through a small device table (Segment).
//
//   histogram_kernel  per pass: 2048-bin counts of the next 11-bit digit of the keys that match
//                     the threshold bits found so far, in a shared-memory histogram per block,
//                     added with atomics into the global (groups, 2048) histogram whenever the
//                     block moves on to another group. The first pass also flags NaN per tensor.
//   narrow_kernel     one block per group: a scan of the histogram from the top bin finds the
//                     bin holding the k-th key, i.e. the next digit of the threshold T. A group
//                     is done once that bin holds exactly the elements still to keep (all kept;
//                     random scores end here), or once all digits of T are known.
//   tie_count_kernel  groups whose T is shared by more keys than are to be kept: ties per tile;
//   tie_scan_kernel   one block per such group: exclusive prefix sum of its tiles' tie counts;
//   write_kernel      one warp per mask word (lane j = bit j, a ballot makes the word): key > T
//                     kept, key == T kept iff its tie rank < k - count(key > T) (ranks counted
//                     only in groups that keep some but not all of their ties).
// Extra memory: the table, the (groups, 2048) 64-bit histogram and 12 bytes per tile, never O(n).
// All group decisions stay on the GPU: the host waits only while the table is uploaded (the
// caller reads nan_flags afterwards).
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "topk_mask.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "sparse_engine's CUDA kernels need sm_80 or newer: fix TORCH_CUDA_ARCH_LIST"
#endif

namespace sparse_engine::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int64_t kTileWords = 128;
constexpr unsigned kFullWarp = 0xffffffffu;

// Order-preserving keys on the raw bits of each score type.
struct Float32Key {
  using Bits = uint32_t;
  static constexpr int kKeyBits = 32;
  __device__ static bool is_nan(Bits u) { return (u & 0x7fffffffu) > 0x7f800000u; }
  __device__ static uint32_t key(Bits u, uint32_t flip) {
    u = (u == 0x80000000u) ? 0u : u;  // -0.0 -> +0.0
    return u ^ ((u & 0x80000000u) ? 0xffffffffu : 0x80000000u) ^ flip;
  }
};

template <uint32_t kInfBits>
struct Key16 {
  using Bits = uint16_t;
  static constexpr int kKeyBits = 16;
  __device__ static bool is_nan(Bits u) { return (u & 0x7fffu) > kInfBits; }
  __device__ static uint32_t key(Bits b, uint32_t flip) {
    uint32_t u = b;
    u = (u == 0x8000u) ? 0u : u;  // -0.0 -> +0.0
    return u ^ ((u & 0x8000u) ? 0xffffu : 0x8000u) ^ flip;
  }
};
using Float16Key = Key16<0x7c00u>;
using BFloat16Key = Key16<0x7f80u>;

enum Mode : int32_t {
  kSearching,       // threshold bits still to find
  kKeepNone,        // k == 0
  kKeepAll,         // k == n
  kKeepAtOrAbove,   // keep (key >> shift) >= prefix: the last bin held exactly the rest
  kKeepRankedTies,  // keep key > prefix, and the first `rest` keys == prefix (shift == 0)
};

// One score tensor of the call.
struct Segment {
  const void* scores;
  int32_t* mask;
  int64_t rows, cols, words_per_row;
  int64_t tile_begin;  // its first tile; segments are sorted by (group, tensor index)
  int64_t tensor;      // index in the call (for nan_flags)
  int64_t group;
};

// Where the search of one group stands: the high bits `prefix` of T are known, `shift` low bits
// are not, and `rest` of the elements whose key has those high bits are still to be kept.
struct GroupState {
  unsigned long long rest;
  uint32_t prefix;
  int32_t shift;
  int32_t mode;
  int64_t tile_begin, tile_end;  // the group's tiles
};

struct Plan {
  const Segment* segments;
  int64_t num_segments;
  GroupState* groups;
  unsigned long long* hist;       // (groups, kBins), zeroed before each histogram pass
  unsigned int* tie_count;        // (tiles,)
  unsigned long long* tie_rank;   // (tiles,): ties of the group before the tile
  int64_t num_tiles;
  int32_t* nan_flags;             // (tensors,)
  uint32_t flip;                  // key inversion for largest=False
};

// ---------------------------------------------------------------------------------------------
// Tiles

// The contiguous run of tiles of this block.
struct TileRange {
  int64_t begin, end;
};

__device__ TileRange block_tiles(int64_t num_tiles) {
  const int64_t per_block = (num_tiles + gridDim.x - 1) / gridDim.x;
  const int64_t begin = min(num_tiles, static_cast<int64_t>(blockIdx.x) * per_block);
  return {begin, min(num_tiles, begin + per_block)};
}

// The segment holding `tile`: the last one that starts at or before it (empty segments share the
// tile_begin of the next one, so they are passed over). The block finds its first segment by
// bisection, then steps forward tile by tile.
__device__ int64_t find_segment(const Plan& p, int64_t tile) {
  int64_t lo = 0, hi = p.num_segments - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (p.segments[mid].tile_begin <= tile) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ int64_t advance_segment(const Plan& p, int64_t tile, int64_t seg) {
  while (seg + 1 < p.num_segments && p.segments[seg + 1].tile_begin <= tile) ++seg;
  return seg;
}

// Mask words [w0, w1) of a tile and the scores [e0, e1) they cover. Words do not straddle rows:
// each row is padded to whole words.
struct Tile {
  int64_t w0, w1, e0, e1;
};

__device__ int64_t first_score(const Segment& s, int64_t word) {
  const int64_t row = word / s.words_per_row;
  return row >= s.rows ? s.rows * s.cols : row * s.cols + (word - row * s.words_per_row) * 32;
}

__device__ Tile tile_of(const Segment& s, int64_t tile) {
  const int64_t w0 = (tile - s.tile_begin) * kTileWords;
  const int64_t w1 = min(s.rows * s.words_per_row, w0 + kTileWords);
  return {w0, w1, first_score(s, w0), first_score(s, w1)};
}

// ---------------------------------------------------------------------------------------------
// Kernels

// Adds the block's counts for `group` to the global histogram and clears them.
__device__ void flush_counts(const Plan& p, int64_t group, unsigned int* counts) {
  __syncthreads();
  for (int b = threadIdx.x; b < kBins; b += kThreads) {
    if (counts[b] != 0) {
      atomicAdd(&p.hist[group * kBins + b], static_cast<unsigned long long>(counts[b]));
      counts[b] = 0;
    }
  }
  __syncthreads();
}

// Shared counts are 32-bit: a block holds them for at most its run of tiles, far fewer than
// 2^32 scores on any GPU.
template <class K>
__global__ void __launch_bounds__(kThreads) histogram_kernel(const Plan p, const bool first) {
  using Bits = typename K::Bits;
  __shared__ unsigned int counts[kBins];
  for (int b = threadIdx.x; b < kBins; b += kThreads) counts[b] = 0;
  __syncthreads();

  const TileRange range = block_tiles(p.num_tiles);
  if (range.begin >= range.end) return;
  int64_t seg = find_segment(p, range.begin);
  int64_t counted_group = -1;  // the group whose counts are in `counts`
  // Every branch below depends on the tile only, so the whole block takes it.
  for (int64_t tile = range.begin; tile < range.end; ++tile) {
    seg = advance_segment(p, tile, seg);
    const Segment& s = p.segments[seg];
    const GroupState g = p.groups[s.group];
    const bool searching = g.mode == kSearching;
    if (!first && !searching) continue;
    if (searching && s.group != counted_group) {
      if (counted_group >= 0) flush_counts(p, counted_group, counts);
      counted_group = s.group;
    }
    const int digit_bits = min(kDigitBits, static_cast<int>(g.shift));
    const int digit_shift = g.shift - digit_bits;
    const uint32_t digit_mask = (1u << digit_bits) - 1;
    const Tile t = tile_of(s, tile);
    const Bits* scores = static_cast<const Bits*>(s.scores);
    bool nan = false;
    for (int64_t e = t.e0 + threadIdx.x; e < t.e1; e += kThreads) {
      const Bits u = scores[e];
      if (first) nan |= K::is_nan(u);
      if (!searching) continue;
      const uint32_t key = K::key(u, p.flip);
      // On the first pass shift is the key width and every key matches (64 bits keep the shift defined).
      if ((static_cast<uint64_t>(key) >> g.shift) == g.prefix) {
        atomicAdd(&counts[(key >> digit_shift) & digit_mask], 1u);
      }
    }
    if (nan) p.nan_flags[s.tensor] = 1;
  }
  if (counted_group >= 0) flush_counts(p, counted_group, counts);
}

// One block per group. Thread i holds bins kBins-1-8i down to kBins-8-8i, so an exclusive scan of
// the threads' sums counts the keys above each thread's bins; the thread whose bins hold the
// rest-th key finds its bin. (Bins past 1 << digit_bits stay empty.)
__global__ void __launch_bounds__(kThreads) narrow_kernel(const Plan p) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  GroupState* state = p.groups + blockIdx.x;
  const GroupState g = *state;
  if (g.mode != kSearching) return;
  const unsigned long long* hist = p.hist + static_cast<int64_t>(blockIdx.x) * kBins;
  unsigned long long local[kBinsPerThread];
  unsigned long long sum = 0;
  for (int i = 0; i < kBinsPerThread; ++i) {
    local[i] = hist[kBins - 1 - (threadIdx.x * kBinsPerThread + i)];
    sum += local[i];
  }
  unsigned long long above;
  Scan(scan_storage).ExclusiveSum(sum, above);
  if (!(above < g.rest && g.rest <= above + sum)) return;
  for (int i = 0; i < kBinsPerThread; ++i) {
    if (above + local[i] < g.rest) {
      above += local[i];
      continue;
    }
    const int digit_bits = min(kDigitBits, static_cast<int>(g.shift));
    const uint32_t bin = kBins - 1 - (threadIdx.x * kBinsPerThread + i);
    GroupState next = g;
    next.prefix = (g.prefix << digit_bits) | bin;
    next.shift = g.shift - digit_bits;
    next.rest = g.rest - above;
    next.mode = local[i] == next.rest ? kKeepAtOrAbove : (next.shift == 0 ? kKeepRankedTies : kSearching);
    *state = next;
    return;
  }
}

// Ties (key == T) per tile of the groups that keep only some of them.
template <class K>
__global__ void __launch_bounds__(kThreads) tie_count_kernel(const Plan p) {
  using Bits = typename K::Bits;
  using Reduce = cub::BlockReduce<unsigned int, kThreads>;
  __shared__ typename Reduce::TempStorage reduce_storage;
  const TileRange range = block_tiles(p.num_tiles);
  if (range.begin >= range.end) return;
  int64_t seg = find_segment(p, range.begin);
  for (int64_t tile = range.begin; tile < range.end; ++tile) {
    seg = advance_segment(p, tile, seg);
    const Segment& s = p.segments[seg];
    const GroupState g = p.groups[s.group];
    if (g.mode != kKeepRankedTies) continue;
    const Tile t = tile_of(s, tile);
    const Bits* scores = static_cast<const Bits*>(s.scores);
    unsigned int ties = 0;
    for (int64_t e = t.e0 + threadIdx.x; e < t.e1; e += kThreads) ties += K::key(scores[e], p.flip) == g.prefix;
    const unsigned int total = Reduce(reduce_storage).Sum(ties);
    if (threadIdx.x == 0) p.tie_count[tile] = total;
    __syncthreads();  // reduce_storage is reused by the next tile
  }
}

// One block per group: tie_rank = exclusive prefix sum of tie_count over the group's tiles.
__global__ void __launch_bounds__(kThreads) tie_scan_kernel(const Plan p) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const GroupState g = p.groups[blockIdx.x];
  if (g.mode != kKeepRankedTies) return;
  unsigned long long carry = 0;
  for (int64_t base = g.tile_begin; base < g.tile_end; base += kThreads) {
    const int64_t tile = base + threadIdx.x;
    const unsigned long long count = tile < g.tile_end ? p.tie_count[tile] : 0;
    unsigned long long before, total;
    Scan(scan_storage).ExclusiveSum(count, before, total);
    if (tile < g.tile_end) p.tie_rank[tile] = carry + before;
    carry += total;
    __syncthreads();  // scan_storage is reused by the next batch
  }
}

// Lane `lane` of word w: where its score is, if the word has one there.
template <class K>
__device__ bool lane_score(const Segment& s, int64_t w, int lane, typename K::Bits* bits) {
  const int64_t row = w / s.words_per_row;
  const int64_t col = (w - row * s.words_per_row) * 32 + lane;
  if (col >= s.cols) return false;
  *bits = static_cast<const typename K::Bits*>(s.scores)[row * s.cols + col];
  return true;
}

// Words of a tile of a group whose ties are all kept or all dropped: one ballot per word.
template <class K>
__device__ void write_words(const Plan& p, const Segment& s, const GroupState& g, const Tile& t) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t w = t.w0 + warp; w < t.w1; w += kWarps) {
    typename K::Bits bits;
    bool keep = false;
    if (lane_score<K>(s, w, lane, &bits)) {
      keep = g.mode == kKeepAll ||
             (g.mode == kKeepAtOrAbove && (K::key(bits, p.flip) >> g.shift) >= g.prefix);
    }
    const unsigned word = __ballot_sync(kFullWarp, keep);
    if (lane == 0) s.mask[w] = static_cast<int32_t>(word);
  }
}

// Words of a tile of a group that keeps only its first g.rest ties (key == T): the block walks
// the tile in rounds of one word per warp, counting the ties before each lane's.
template <class K>
__device__ void write_ranked_words(const Plan& p, const Segment& s, const GroupState& g, const Tile& t,
                                   unsigned long long rank, unsigned int* warp_ties) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t base = t.w0; base < t.w1; base += kWarps) {
    const int64_t w = base + warp;  // the same for the whole warp
    typename K::Bits bits;
    bool keep = false, tie = false;
    if (w < t.w1 && lane_score<K>(s, w, lane, &bits)) {
      const uint32_t key = K::key(bits, p.flip);
      keep = key > g.prefix;
      tie = key == g.prefix;
    }
    const unsigned ties = __ballot_sync(kFullWarp, tie);
    if (lane == 0) warp_ties[warp] = __popc(ties);
    __syncthreads();
    // Ties of the group before this lane's: before the round, in earlier warps, in lower lanes.
    unsigned long long before = rank + __popc(ties & ((1u << lane) - 1));
    for (int i = 0; i < kWarps; ++i) {
      if (i < warp) before += warp_ties[i];
      rank += warp_ties[i];
    }
    __syncthreads();  // warp_ties is rewritten by the next round
    keep |= tie && before < g.rest;
    const unsigned word = __ballot_sync(kFullWarp, keep);
    if (w < t.w1 && lane == 0) s.mask[w] = static_cast<int32_t>(word);
  }
}

template <class K>
__global__ void __launch_bounds__(kThreads) write_kernel(const Plan p) {
  __shared__ unsigned int warp_ties[kWarps];
  const TileRange range = block_tiles(p.num_tiles);
  if (range.begin >= range.end) return;
  int64_t seg = find_segment(p, range.begin);
  for (int64_t tile = range.begin; tile < range.end; ++tile) {
    seg = advance_segment(p, tile, seg);
    const Segment& s = p.segments[seg];
    const GroupState g = p.groups[s.group];
    const Tile t = tile_of(s, tile);
    if (g.mode == kKeepRankedTies) {
      write_ranked_words<K>(p, s, g, t, p.tie_rank[tile], warp_ties);
    } else {
      write_words<K>(p, s, g, t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

int64_t words_of(const TopkTensor& t) { return t.rows * ((t.cols + 31) / 32); }

int64_t tiles_of(const TopkTensor& t) { return (words_of(t) + kTileWords - 1) / kTileWords; }

// Workspace: [segments | group states] (uploaded together) | histogram | tie counts | tie ranks.
struct Layout {
  size_t groups, hist, tie_count, tie_rank, total;
  int64_t num_tiles;
};

Layout layout_of(const TopkTensor* tensors, int64_t num_tensors, int64_t num_groups) {
  Layout l;
  l.num_tiles = 0;
  for (int64_t i = 0; i < num_tensors; ++i) l.num_tiles += tiles_of(tensors[i]);
  l.groups = align_up(sizeof(Segment) * num_tensors);
  l.hist = l.groups + align_up(sizeof(GroupState) * num_groups);
  l.tie_count = l.hist + align_up(sizeof(unsigned long long) * kBins * num_groups);
  l.tie_rank = l.tie_count + align_up(sizeof(unsigned int) * l.num_tiles);
  l.total = l.tie_rank + align_up(sizeof(unsigned long long) * l.num_tiles);
  return l;
}

// Enough blocks to fill the GPU, each looping over its run of tiles.
template <class Kernel>
cudaError_t persistent_grid(Kernel kernel, int64_t num_tiles, unsigned* grid) {
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  *grid = static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(num_tiles, int64_t(sms) * std::max(per_sm, 1))));
  return err;
}

template <class K>
cudaError_t run(const TopkTensor* tensors, int64_t num_tensors, const int64_t* ks, int64_t num_groups,
                bool largest, void* workspace, int32_t* nan_flags, cudaStream_t stream) {
  const Layout layout = layout_of(tensors, num_tensors, num_groups);
  auto* base = static_cast<unsigned char*>(workspace);

  // The table, in (group, tensor index) order, and the start of every group's search.
  std::vector<int64_t> order(num_tensors);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return tensors[a].group < tensors[b].group; });
  std::vector<unsigned char> table(layout.hist, 0);
  auto* segments = reinterpret_cast<Segment*>(table.data());
  auto* groups = reinterpret_cast<GroupState*>(table.data() + layout.groups);
  std::vector<int64_t> sizes(num_groups, 0);
  for (int64_t g = 0; g < num_groups; ++g) groups[g] = GroupState{};
  int64_t tile = 0;
  for (int64_t i = 0; i < num_tensors; ++i) {
    const TopkTensor& t = tensors[order[i]];
    segments[i] = Segment{t.scores, t.mask, t.rows, t.cols, (t.cols + 31) / 32, tile, order[i], t.group};
    sizes[t.group] += t.rows * t.cols;
    if (i == 0 || tensors[order[i - 1]].group != t.group) groups[t.group].tile_begin = tile;
    tile += tiles_of(t);
    groups[t.group].tile_end = tile;
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    GroupState& s = groups[g];
    s.mode = ks[g] == 0 ? kKeepNone : (ks[g] == sizes[g] ? kKeepAll : kSearching);
    s.shift = K::kKeyBits;
    s.prefix = 0;
    s.rest = static_cast<unsigned long long>(ks[g]);
  }

  cudaError_t err = cudaMemsetAsync(nan_flags, 0, sizeof(int32_t) * num_tensors, stream);
  if (err != cudaSuccess || layout.num_tiles == 0) return err;
  // From pageable memory: returns once `table` is staged, so it may then be freed.
  err = cudaMemcpyAsync(base, table.data(), table.size(), cudaMemcpyHostToDevice, stream);
  if (err != cudaSuccess) return err;

  Plan p;
  p.segments = reinterpret_cast<const Segment*>(base);
  p.num_segments = num_tensors;
  p.groups = reinterpret_cast<GroupState*>(base + layout.groups);
  p.hist = reinterpret_cast<unsigned long long*>(base + layout.hist);
  p.tie_count = reinterpret_cast<unsigned int*>(base + layout.tie_count);
  p.tie_rank = reinterpret_cast<unsigned long long*>(base + layout.tie_rank);
  p.num_tiles = layout.num_tiles;
  p.nan_flags = nan_flags;
  p.flip = largest ? 0u : (K::kKeyBits == 32 ? 0xffffffffu : 0xffffu);

  unsigned hist_grid = 0, ties_grid = 0, write_grid = 0;
  if ((err = persistent_grid(histogram_kernel<K>, layout.num_tiles, &hist_grid)) != cudaSuccess) return err;
  if ((err = persistent_grid(tie_count_kernel<K>, layout.num_tiles, &ties_grid)) != cudaSuccess) return err;
  if ((err = persistent_grid(write_kernel<K>, layout.num_tiles, &write_grid)) != cudaSuccess) return err;
  const unsigned group_grid = static_cast<unsigned>(num_groups);

  constexpr int kPasses = (K::kKeyBits + kDigitBits - 1) / kDigitBits;
  for (int pass = 0; pass < kPasses; ++pass) {
    err = cudaMemsetAsync(p.hist, 0, sizeof(unsigned long long) * kBins * num_groups, stream);
    if (err != cudaSuccess) return err;
    histogram_kernel<K><<<hist_grid, kThreads, 0, stream>>>(p, pass == 0);
    narrow_kernel<<<group_grid, kThreads, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  tie_count_kernel<K><<<ties_grid, kThreads, 0, stream>>>(p);
  tie_scan_kernel<<<group_grid, kThreads, 0, stream>>>(p);
  write_kernel<K><<<write_grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t topk_mask_workspace_bytes(const TopkTensor* tensors, int64_t num_tensors, int64_t num_groups) {
  return layout_of(tensors, num_tensors, num_groups).total;
}

cudaError_t topk_mask(DType dtype, const TopkTensor* tensors, int64_t num_tensors, const int64_t* ks,
                      int64_t num_groups, bool largest, void* workspace, size_t workspace_bytes,
                      int32_t* nan_flags, cudaStream_t stream) {
  if (workspace_bytes < topk_mask_workspace_bytes(tensors, num_tensors, num_groups)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return run<Float32Key>(tensors, num_tensors, ks, num_groups, largest, workspace, nan_flags, stream);
    case DType::kFloat16:
      return run<Float16Key>(tensors, num_tensors, ks, num_groups, largest, workspace, nan_flags, stream);
    case DType::kBFloat16:
      return run<BFloat16Key>(tensors, num_tensors, ks, num_groups, largest, workspace, nan_flags, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sparse_engine::cuda
