// Element types the CUDA launchers accept. The launchers are torch-free, so the torch glue
// (csrc/bindings.cpp) maps at::ScalarType onto this enum.
#pragma once

namespace sparse_engine::cuda {

enum class DType : int {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
};

}  // namespace sparse_engine::cuda
