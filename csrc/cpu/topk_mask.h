// topk_mask on the CPU: keep exactly k[g] elements of each group g of score tensors, written as
// bit-packed masks (the contract's rule: rank by score, ties broken by tensor index, then flat
// index; -0.0 == +0.0; NaN is an error). Torch-free, so the CMake build compiles it too.
//
// Each score tensor is given in its 2-D selection view (rows, cols) (rank >= 2: rows = shape[0];
// rank <= 1: rows = 1), contiguous; its mask is contiguous int32 (rows, ceil(cols / 32)), every
// word written, padding bits 0.
#pragma once

#include <cstdint>

namespace sparse_engine::cpu {

enum class ScoreType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

struct TopkTensor {
  const void* scores;  // contiguous (rows, cols) scores of the call's ScoreType
  int64_t rows;
  int64_t cols;
  int32_t* mask;       // contiguous int32 (rows, ceil(cols / 32)), written
  int64_t group;       // in [0, num_groups)
};

// ks: num_groups values, 0 <= ks[g] <= the number of scores in group g (checked by the caller).
// Returns -1, or the lowest index of a tensor that contains NaN (its group's masks are then not
// written; the caller raises).
int64_t topk_mask(ScoreType dtype, const TopkTensor* tensors, int64_t num_tensors, const int64_t* ks,
                  int64_t num_groups, bool largest);

}  // namespace sparse_engine::cpu
