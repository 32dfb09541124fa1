// topk_mask on the CPU: an OpenMP radix select over order-preserving integer keys.
//
// Keys. A score's raw bits map to an unsigned key whose integer order is the score order: -0.0 is
// first made +0.0, then negative scores have all bits flipped and the others only the sign bit;
// for largest=False the key is inverted. fp16/bf16 scores get 16-bit keys of their own bits
// (ordering them is the same as ordering their exact float32 values), so they need 2 passes
// where fp32 needs 3.
//
// Selection of group g (k of its n scores, 0 < k < n): find its threshold key T with
// count(key > T) < k <= count(key >= T), 11 bits of T per pass (2048-bin histograms over the
// keys that match the bits found so far). A group is done as soon as the chosen bin holds exactly
// the elements still to keep (then every key in it is kept; random scores stop here), or when all
// bits are known. The write pass sets bit 1 for key > T, and for key == T iff the element's rank
// among the ties, in (tensor index, flat index) order, is below k - count(key > T). k == 0 and
// k == n write zeros / ones without a search (their scores are still checked for NaN).
//
// Parallelism: chosen per group, so that all threads stay busy.
//   - Small groups (most per-layer selections) run whole, one group per thread, with one
//     2048-bin histogram per thread; tie ranks are a running count in the write pass.
//   - Large groups (size >= total / (4 * threads), e.g. one global selection) are split into
//     chunks of ~64K scores (at 32-element word boundaries of each row, so chunks write whole
//     mask words). Each pass counts into per-thread (group, bin) histograms that are then summed;
//     tie ranks come from per-chunk tie counts, prefix-summed in (tensor, chunk) order. The
//     per-thread histograms (two sets, see select_chunked) cost 2 x threads x groups x 2048 x 8
//     bytes, so large groups go in batches of at most kHistBudget counters.
// Extra memory: the histograms (at most kHistBudget counters per batch, one 2048-bin histogram
// per thread for small groups) and O(tensors + chunks) bookkeeping, never O(n).
//
// Hot loops are kept vectorisable (branch-free keys, `omp simd`, byte flags packed by a multiply);
// the first pass's histogram increments are what remains, about half the time at 1e7 scores.
#include "topk_mask.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "bits_of_bytes below assumes little-endian byte order"
#endif

namespace sparse_engine::cpu {
namespace {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
// Scores per chunk of a large group: a few hundred KB, enough to amortise scheduling.
constexpr int64_t kChunkScores = int64_t(1) << 16;
// Below this a group is never split: one thread selects it in well under a millisecond.
constexpr int64_t kMinChunkedGroup = int64_t(1) << 15;
// Per-thread histogram counters of one batch of large groups (16 MiB of int64).
constexpr int64_t kHistBudget = int64_t(1) << 21;

// Order-preserving keys on the raw bits of each score type. Written without branches: signs are
// random, and the loops over keys vectorise.
struct Float32Key {
  using Bits = uint32_t;
  static constexpr int kKeyBits = 32;
  static bool is_nan(Bits u) { return (u & 0x7fffffffu) > 0x7f800000u; }
  static uint32_t key(Bits u, uint32_t flip) {
    u &= 0u - static_cast<uint32_t>(u != 0x80000000u);  // -0.0 -> +0.0
    const uint32_t negative = 0u - (u >> 31);           // all ones for a negative score
    return u ^ (negative | 0x80000000u) ^ flip;
  }
};

template <uint32_t kInfBits>
struct Key16 {
  using Bits = uint16_t;
  static constexpr int kKeyBits = 16;
  static bool is_nan(Bits u) { return (u & 0x7fffu) > kInfBits; }
  static uint32_t key(Bits b, uint32_t flip) {
    uint32_t u = b;
    u &= 0u - static_cast<uint32_t>(u != 0x8000u);  // -0.0 -> +0.0
    const uint32_t negative = (0u - (u >> 15)) & 0xffffu;
    return u ^ (negative | 0x8000u) ^ flip;
  }
};
using Float16Key = Key16<0x7c00u>;
using BFloat16Key = Key16<0x7f80u>;

enum class Mode : uint8_t {
  kSearching,       // threshold bits still to find
  kKeepNone,        // k == 0
  kKeepAll,         // k == n
  kKeepAtOrAbove,   // keep (key >> shift) >= prefix: the last bin held exactly the rest
  kKeepRankedTies,  // keep key > prefix, and the first `rest` keys == prefix (shift == 0)
};

// Where the search of one group stands: the high bits `prefix` of T are known, `shift` low bits
// are not, and `rest` of the elements whose key has those high bits are still to be kept.
struct Selection {
  Mode mode = Mode::kSearching;
  int shift = 0;
  uint32_t prefix = 0;
  int64_t rest = 0;
};

template <class K>
Selection start_selection(int64_t k, int64_t n) {
  Selection s;
  s.mode = k == 0 ? Mode::kKeepNone : (k == n ? Mode::kKeepAll : Mode::kSearching);
  s.shift = K::kKeyBits;
  s.rest = k;
  return s;
}

int digit_bits(const Selection& s) { return std::min(kDigitBits, s.shift); }

// Fixes the next digit of T from the histogram of the matching keys by that digit.
void narrow(Selection& s, const int64_t* hist) {
  const int bits = digit_bits(s);
  // Counts of the matching keys add up to >= rest, so the scan stops at some bin >= 0.
  int64_t above = 0;
  int bin = (1 << bits) - 1;
  for (; bin > 0 && above + hist[bin] < s.rest; --bin) above += hist[bin];
  s.prefix = (s.prefix << bits) | static_cast<uint32_t>(bin);
  s.shift -= bits;
  s.rest -= above;
  if (hist[bin] == s.rest) {
    s.mode = Mode::kKeepAtOrAbove;
  } else if (s.shift == 0) {
    s.mode = Mode::kKeepRankedTies;
  }
}

template <class K>
int64_t count_nan(const typename K::Bits* p, int64_t n) {
  int64_t nan = 0;
  for (int64_t i = 0; i < n; ++i) nan += K::is_nan(p[i]);
  return nan;
}

// First pass: histogram of the top digit of every key, and the NaN count.
template <class K>
int64_t histogram_top(const typename K::Bits* p, int64_t n, uint32_t flip, int digit_shift, int64_t* hist) {
  int64_t nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    nan += K::is_nan(p[i]);
    ++hist[K::key(p[i], flip) >> digit_shift];
  }
  return nan;
}

// 8 bytes of 0/1 -> 8 bits, byte i to bit i, with one multiply (byte i lands in bit 56 + i;
// little-endian byte order, checked above).
uint32_t bits_of_bytes(const uint8_t* flags) {
  uint64_t bytes;
  std::memcpy(&bytes, flags, 8);
  return static_cast<uint32_t>((bytes * 0x0102040810204080ull) >> 56);
}

// Later passes: histogram of the next digit of the keys that match the known prefix. Keys, bins
// and match flags are computed 16 at a time in a vectorised loop; then only the matching keys
// are counted, found as the set bits of the match flags (the matching fraction can be anything,
// so a branch per key would often be mispredicted).
constexpr int kBlock = 16;

template <class K>
void histogram_refine(const typename K::Bits* p, int64_t n, uint32_t flip, const Selection& s, int64_t* hist) {
  const int shift = s.shift, digit_shift = s.shift - digit_bits(s);
  const uint32_t prefix = s.prefix, digit_mask = (1u << digit_bits(s)) - 1;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    uint32_t bins[kBlock];
    uint8_t match[kBlock];
#pragma omp simd
    for (int j = 0; j < kBlock; ++j) {
      const uint32_t key = K::key(p[i + j], flip);
      match[j] = (key >> shift) == prefix;
      bins[j] = (key >> digit_shift) & digit_mask;
    }
    for (uint32_t m = bits_of_bytes(match) | bits_of_bytes(match + 8) << 8; m != 0; m &= m - 1) {
      ++hist[bins[__builtin_ctz(m)]];
    }
  }
  for (; i < n; ++i) {
    const uint32_t key = K::key(p[i], flip);
    if ((key >> shift) == prefix) ++hist[(key >> digit_shift) & digit_mask];
  }
}

// One pass over n scores of a group in the state s; returns the NaN count on the first pass.
template <class K>
int64_t scan(const typename K::Bits* p, int64_t n, uint32_t flip, const Selection& s, bool first, int64_t* hist) {
  if (first) {
    if (s.mode != Mode::kSearching) return count_nan<K>(p, n);
    return histogram_top<K>(p, n, flip, s.shift - digit_bits(s), hist);
  }
  if (s.mode == Mode::kSearching) histogram_refine<K>(p, n, flip, s, hist);
  return 0;
}

template <class K>
int64_t count_ties(const typename K::Bits* p, int64_t n, uint32_t flip, const Selection& s) {
  const uint32_t threshold = s.prefix;
  int64_t ties = 0;
  for (int64_t i = 0; i < n; ++i) ties += K::key(p[i], flip) == threshold;
  return ties;
}

// Calls word_of(scores of the word, count) for mask words [w0, w1) of a (rows, cols) tensor and
// stores the results. Words do not straddle rows: each row is padded to whole words.
template <class Bits, class WordOf>
void for_each_word(const Bits* p, int64_t cols, int64_t w0, int64_t w1, int32_t* mask, WordOf word_of) {
  if (w0 >= w1) return;
  const int64_t words_per_row = (cols + 31) / 32;
  int64_t row = w0 / words_per_row;
  int64_t col = (w0 - row * words_per_row) * 32;
  for (int64_t w = w0; w < w1; ++w) {
    const int n = static_cast<int>(std::min<int64_t>(32, cols - col));
    mask[w] = static_cast<int32_t>(word_of(p + row * cols + col, n));
    col += 32;
    if (col >= cols) {
      col = 0;
      ++row;
    }
  }
}

// Bit j = keep(e[j]) for j < n <= 32. For full words the flags go to bytes first, a loop the
// compiler vectorises, then to bits 8 at a time.
template <class Bits, class Keep>
uint32_t pack_bits(const Bits* e, int n, Keep keep) {
  uint32_t word = 0;
  if (n < 32) {
    for (int j = 0; j < n; ++j) word |= static_cast<uint32_t>(keep(e[j])) << j;
    return word;
  }
  uint8_t flags[32];
  for (int j = 0; j < 32; ++j) flags[j] = keep(e[j]);
  for (int b = 0; b < 4; ++b) word |= bits_of_bytes(flags + 8 * b) << (8 * b);
  return word;
}

// Writes mask words [w0, w1) of one tensor. `tie_rank` is the number of ties (key == T) of the
// group before word w0; returns the number of ties in the range.
template <class K>
int64_t write_words(const typename K::Bits* p, int64_t cols, int64_t w0, int64_t w1, uint32_t flip,
                    const Selection& s, int64_t tie_rank, int32_t* mask) {
  using Bits = typename K::Bits;
  // Locals: the compiler cannot tell that the mask stores leave `s` unchanged.
  const int shift = s.shift;
  const uint32_t prefix = s.prefix;
  const int64_t rest = s.rest;
  switch (s.mode) {
    case Mode::kSearching:  // not reached: every search ends in one of the modes below
    case Mode::kKeepNone:
      for_each_word(p, cols, w0, w1, mask, [](const Bits*, int) { return 0u; });
      return 0;
    case Mode::kKeepAll:
      for_each_word(p, cols, w0, w1, mask, [](const Bits*, int n) { return n == 32 ? ~0u : (1u << n) - 1; });
      return 0;
    case Mode::kKeepAtOrAbove:
      for_each_word(p, cols, w0, w1, mask, [&](const Bits* e, int n) {
        return pack_bits(e, n, [&](Bits u) { return (K::key(u, flip) >> shift) >= prefix; });
      });
      return 0;
    case Mode::kKeepRankedTies: {
      const int64_t first_rank = tie_rank;
      for_each_word(p, cols, w0, w1, mask, [&](const Bits* e, int n) {
        const uint32_t above = pack_bits(e, n, [&](Bits u) { return K::key(u, flip) > prefix; });
        uint32_t ties = pack_bits(e, n, [&](Bits u) { return K::key(u, flip) == prefix; });
        // Keep the first (rest - tie_rank) ties, lowest bits first.
        const int64_t budget = rest - tie_rank;
        tie_rank += __builtin_popcount(ties);
        if (budget >= 32) return above | ties;
        uint32_t kept = 0;
        for (int64_t m = budget; m > 0 && ties; --m) {
          kept |= ties & (0u - ties);
          ties &= ties - 1;
        }
        return above | kept;
      });
      return tie_rank - first_rank;
    }
  }
  return 0;
}

template <class K>
class TopkSelect {
 public:
  using Bits = typename K::Bits;

  TopkSelect(const TopkTensor* tensors, int64_t num_tensors, const int64_t* ks, int64_t num_groups, bool largest)
      : tensors_(tensors),
        ks_(ks),
        flip_(largest ? 0u : (K::kKeyBits == 32 ? 0xffffffffu : 0xffffu)),
        threads_(std::max(1, omp_get_max_threads())),
        members_(num_groups),
        sizes_(num_groups, 0),
        nan_(num_tensors, 0) {
    for (int64_t t = 0; t < num_tensors; ++t) {
      members_[tensors[t].group].push_back(t);
      sizes_[tensors[t].group] += numel(t);
    }
  }

  int64_t run() {
    const int64_t num_groups = static_cast<int64_t>(members_.size());
    const int64_t total = std::accumulate(sizes_.begin(), sizes_.end(), int64_t(0));
    const int64_t large = std::max(kMinChunkedGroup, total / (4 * threads_));
    std::vector<int64_t> small, big;
    for (int64_t g = 0; g < num_groups; ++g) {
      (threads_ > 1 && sizes_[g] >= large ? big : small).push_back(g);
    }
    // Largest first, so that dynamic scheduling balances the threads.
    std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) { return sizes_[a] > sizes_[b]; });
    select_small(small);
    const int64_t batch = std::max<int64_t>(1, kHistBudget / (2 * threads_ * kBins));
    for (size_t b = 0; b < big.size(); b += batch) {
      select_chunked(std::vector<int64_t>(big.begin() + b, big.begin() + std::min(big.size(), b + batch)));
    }
    const auto bad = std::find(nan_.begin(), nan_.end(), 1);
    return bad == nan_.end() ? -1 : bad - nan_.begin();
  }

 private:
  struct Chunk {
    int64_t tensor, slot;  // slot: the group's index in the batch
    int64_t w0, w1;        // mask words
    int64_t e0, e1;        // scores
    int64_t nan = 0, ties = 0;
  };

  int64_t numel(int64_t t) const { return tensors_[t].rows * tensors_[t].cols; }
  int64_t words(int64_t t) const { return tensors_[t].rows * ((tensors_[t].cols + 31) / 32); }
  const Bits* scores(int64_t t) const { return static_cast<const Bits*>(tensors_[t].scores); }

  // Each group whole on one thread.
  void select_small(const std::vector<int64_t>& groups) {
    const int64_t count = static_cast<int64_t>(groups.size());
    std::vector<int64_t> hists(static_cast<size_t>(threads_) * kBins);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_) if (count > 1)
    for (int64_t i = 0; i < count; ++i) {
      select_group(groups[i], hists.data() + static_cast<int64_t>(omp_get_thread_num()) * kBins);
    }
  }

  void select_group(int64_t g, int64_t* hist) {
    const std::vector<int64_t>& members = members_[g];
    Selection s = start_selection<K>(ks_[g], sizes_[g]);
    for (bool first = true; first || s.mode == Mode::kSearching; first = false) {
      std::fill(hist, hist + kBins, 0);
      bool nan = false;
      for (int64_t t : members) {
        if (scan<K>(scores(t), numel(t), flip_, s, first, hist) > 0) nan = (nan_[t] = 1);
      }
      if (nan) return;
      if (s.mode == Mode::kSearching) narrow(s, hist);
    }
    int64_t tie_rank = 0;
    for (int64_t t : members) {
      tie_rank += write_words<K>(scores(t), tensors_[t].cols, 0, words(t), flip_, s, tie_rank, tensors_[t].mask);
    }
  }

  // Groups split into chunks that all threads share, in one parallel region with one barrier per
  // pass: each thread sums the per-thread histograms and narrows every search itself (the same
  // integer sums on every thread, so the same decisions), and the histograms alternate between
  // two buffers, so a thread zeroing its next buffer never races with another still reading the
  // last one. Fewer barriers matter most when the cores are shared with other work.
  void select_chunked(const std::vector<int64_t>& groups) {
    const int64_t slots = static_cast<int64_t>(groups.size());
    std::vector<Selection> start(slots);
    std::vector<Chunk> chunks;
    for (int64_t slot = 0; slot < slots; ++slot) {
      const int64_t g = groups[slot];
      start[slot] = start_selection<K>(ks_[g], sizes_[g]);
      for (int64_t t : members_[g]) add_chunks(t, slot, chunks);
    }
    const int64_t num_chunks = static_cast<int64_t>(chunks.size());
    const int64_t stride = slots * kBins;
    std::vector<int64_t> buffers(2 * static_cast<size_t>(threads_) * stride);
    auto has_nan = [&] { return std::any_of(chunks.begin(), chunks.end(), [](const Chunk& ch) { return ch.nan > 0; }); };

#pragma omp parallel num_threads(threads_)
    {
      const int64_t team = omp_get_num_threads(), me = omp_get_thread_num();
      std::vector<Selection> sel = start;
      std::vector<int64_t> sum(kBins);
      bool nan = false;
      for (int64_t pass = 0;; ++pass) {
        int64_t* hist = buffers.data() + (pass % 2) * threads_ * stride;
        std::fill(hist + me * stride, hist + (me + 1) * stride, 0);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < num_chunks; ++c) {
          Chunk& ch = chunks[c];
          const int64_t count = scan<K>(scores(ch.tensor) + ch.e0, ch.e1 - ch.e0, flip_, sel[ch.slot], pass == 0,
                                        hist + me * stride + ch.slot * kBins);
          if (pass == 0) ch.nan = count;  // read by every thread after this loop's barrier
        }
        nan = pass == 0 && has_nan();
        if (nan) break;
        bool searching = false;
        for (int64_t slot = 0; slot < slots; ++slot) {
          if (sel[slot].mode != Mode::kSearching) continue;
          std::fill(sum.begin(), sum.end(), 0);
          for (int64_t t = 0; t < team; ++t) {
            const int64_t* h = hist + t * stride + slot * kBins;
            for (int b = 0; b < kBins; ++b) sum[b] += h[b];
          }
          narrow(sel[slot], sum.data());
          searching |= sel[slot].mode == Mode::kSearching;
        }
        if (!searching) break;
      }

      if (!nan) {
        const bool ranked =
            std::any_of(sel.begin(), sel.end(), [](const Selection& s) { return s.mode == Mode::kKeepRankedTies; });
        std::vector<int64_t> tie_rank;
        if (ranked) {
#pragma omp for schedule(static)
          for (int64_t c = 0; c < num_chunks; ++c) {
            Chunk& ch = chunks[c];
            const Selection& s = sel[ch.slot];
            ch.ties = s.mode == Mode::kKeepRankedTies ? count_ties<K>(scores(ch.tensor) + ch.e0, ch.e1 - ch.e0, flip_, s) : 0;
          }
          // Chunks are in (group, tensor index, position) order: running sums give the ranks.
          tie_rank.resize(num_chunks);
          std::vector<int64_t> seen(slots, 0);
          for (int64_t c = 0; c < num_chunks; ++c) {
            tie_rank[c] = seen[chunks[c].slot];
            seen[chunks[c].slot] += chunks[c].ties;
          }
        }
#pragma omp for schedule(static) nowait
        for (int64_t c = 0; c < num_chunks; ++c) {
          const Chunk& ch = chunks[c];
          const TopkTensor& t = tensors_[ch.tensor];
          write_words<K>(scores(ch.tensor), t.cols, ch.w0, ch.w1, flip_, sel[ch.slot], ranked ? tie_rank[c] : 0, t.mask);
        }
      }
    }
    for (const Chunk& ch : chunks) {
      if (ch.nan > 0) nan_[ch.tensor] = 1;
    }
  }

  // Splits tensor t into chunks of about kChunkScores scores at word boundaries.
  void add_chunks(int64_t t, int64_t slot, std::vector<Chunk>& chunks) const {
    const int64_t cols = tensors_[t].cols, total_words = words(t);
    const int64_t words_per_row = (cols + 31) / 32;
    const int64_t step = std::max<int64_t>(1, kChunkScores / std::min<int64_t>(32, std::max<int64_t>(cols, 1)));
    auto first_score = [&](int64_t w) {
      return w >= total_words ? numel(t) : (w / words_per_row) * cols + (w % words_per_row) * 32;
    };
    for (int64_t w0 = 0; w0 < total_words; w0 += step) {
      const int64_t w1 = std::min(total_words, w0 + step);
      Chunk ch;
      ch.tensor = t;
      ch.slot = slot;
      ch.w0 = w0;
      ch.w1 = w1;
      ch.e0 = first_score(w0);
      ch.e1 = first_score(w1);
      chunks.push_back(ch);
    }
  }

  const TopkTensor* tensors_;
  const int64_t* ks_;
  const uint32_t flip_;
  const int threads_;
  std::vector<std::vector<int64_t>> members_;  // tensor indices of each group, ascending
  std::vector<int64_t> sizes_;                 // scores in each group
  std::vector<uint8_t> nan_;                   // 1 if the tensor contains NaN
};

}  // namespace

int64_t topk_mask(ScoreType dtype, const TopkTensor* tensors, int64_t num_tensors, const int64_t* ks,
                  int64_t num_groups, bool largest) {
  switch (dtype) {
    case ScoreType::kFloat32:
      return TopkSelect<Float32Key>(tensors, num_tensors, ks, num_groups, largest).run();
    case ScoreType::kFloat16:
      return TopkSelect<Float16Key>(tensors, num_tensors, ks, num_groups, largest).run();
    case ScoreType::kBFloat16:
      return TopkSelect<BFloat16Key>(tensors, num_tensors, ks, num_groups, largest).run();
  }
  return -1;
}

}  // namespace sparse_engine::cpu
