// sparse_engine._C: the one file with torch glue. It checks arguments, then dispatches on the
// tensors' device to the CPU kernels (csrc/cpu) or to the torch-free CUDA launchers (csrc/cuda),
// which get raw pointers, strides, a dtype enum and torch's current CUDA stream.
//
// Mask format (see the contract): mask_bits is int32 (rows, ceil(cols / 32)); bit j of word w of
// row r is the keep-flag of element (r, 32*w + j).
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "cpu/mask_bits.h"
#include "cpu/masked_linear.h"
#include "cpu/topk_mask.h"

#ifdef SPARSE_ENGINE_WITH_CUDA
// c10's stream header rather than ATen/cuda/CUDAContext.h, which also pulls in cuBLAS and
// cuSPARSE headers that a minimal CUDA toolkit lacks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/mask_bits.h"
#include "cuda/masked_linear.h"
#include "cuda/topk_mask.h"
#endif

namespace {

#ifdef SPARSE_ENGINE_WITH_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

int64_t mask_words(int64_t cols) { return (cols + 31) / 32; }

void check_device(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), op, ": ", name, " must be a CPU or CUDA tensor, got one on ", t.device());
  TORCH_CHECK(kCudaBuilt || !t.is_cuda(), op, ": ", name, " is a CUDA tensor, but sparse_engine was built without ",
              "its CUDA kernels (build with a CUDA build of torch and nvcc on the path; SPARSE_ENGINE_CUDA=1 makes ",
              "the build fail instead of skipping them)");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                       const char* op) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

void check_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
}

void check_float(const at::Tensor& t, const char* name, const char* op) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                      const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// Checks that mask_bits packs the mask of a (rows, cols) weight and returns it contiguous.
at::Tensor checked_mask_bits(const at::Tensor& bits, const at::Tensor& ref, const char* ref_name, int64_t rows,
                             int64_t cols, const char* op) {
  check_same_device(bits, "mask_bits", ref, ref_name, op);
  TORCH_CHECK(bits.scalar_type() == at::kInt, op, ": mask_bits must be int32 (as made by pack_mask), got ",
              bits.scalar_type());
  TORCH_CHECK(bits.dim() == 2 && bits.size(0) == rows && bits.size(1) == mask_words(cols), op,
              ": mask_bits must have shape (", rows, ", ", mask_words(cols), ") to mask a (", rows, ", ", cols,
              ") weight, got shape ", bits.sizes());
  return bits.contiguous();
}

// The 2-D view (rows, cols) of a score tensor that its selection mask packs: rank >= 2 gives
// (shape[0], prod(shape[1:])) (also when shape[0] is 0, so the mask has the packed shape of the
// tensor's own shape), rank <= 1 gives (1, numel).
std::pair<int64_t, int64_t> selection_view(const at::Tensor& scores) {
  if (scores.dim() < 2) return {1, scores.numel()};
  int64_t cols = 1;
  for (int64_t d = 1; d < scores.dim(); ++d) cols *= scores.size(d);
  return {scores.size(0), cols};
}

[[noreturn]] void raise_nan(int64_t tensor) {
  throw pybind11::value_error("scores[" + std::to_string(tensor) + "]: contains NaN; NaN scores cannot be ranked");
}

#ifdef SPARSE_ENGINE_WITH_CUDA
namespace cuda_path {

namespace kernels = sparse_engine::cuda;

kernels::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kDouble: return kernels::DType::kFloat64;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    default: TORCH_CHECK(false, "sparse_engine: no CUDA kernel for dtype ", t.scalar_type());
  }
}

kernels::MatrixRef matrix_ref(const at::Tensor& t) { return {t.const_data_ptr(), t.stride(0), t.stride(1)}; }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor pack_mask(const at::Tensor& mask) {
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t rows = mask.size(0), cols = mask.size(1);
  at::Tensor bits = at::empty({rows, mask_words(cols)}, mask.options().dtype(at::kInt));
  check_launch(kernels::pack_mask(static_cast<const uint8_t*>(mask.const_data_ptr()), rows, cols, mask.stride(0),
                                  mask.stride(1), bits.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()),
               "pack_mask");
  return bits;
}

at::Tensor unpack_mask(const at::Tensor& bits, int64_t cols) {
  const c10::cuda::CUDAGuard guard(bits.device());
  at::Tensor mask = at::empty({bits.size(0), cols}, bits.options().dtype(at::kBool));
  check_launch(kernels::unpack_mask(bits.const_data_ptr<int32_t>(), bits.size(0), cols,
                                    static_cast<uint8_t*>(mask.data_ptr()), c10::cuda::getCurrentCUDAStream()),
               "unpack_mask");
  return mask;
}

at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bits,
                             const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  check_launch(kernels::masked_linear_fwd(dtype_of(x), matrix_ref(x), matrix_ref(weight), bits.const_data_ptr<int32_t>(),
                                          b.defined() ? b.const_data_ptr() : nullptr, y.data_ptr(), M, N, K,
                                          c10::cuda::getCurrentCUDAStream()),
               "masked_linear_fwd");
  return y;
}

at::Tensor masked_linear_bwd_input(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& bits) {
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), N = weight.size(0), K = weight.size(1);
  at::Tensor dx = at::empty({M, K}, dy.options());
  check_launch(kernels::masked_linear_bwd_input(dtype_of(dy), matrix_ref(dy), matrix_ref(weight),
                                                bits.const_data_ptr<int32_t>(), dx.data_ptr(), M, N, K,
                                                c10::cuda::getCurrentCUDAStream()),
               "masked_linear_bwd_input");
  return dx;
}

at::Tensor masked_linear_bwd_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& bits) {
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t M = dy.size(0), N = dy.size(1), K = x.size(1);
  at::Tensor dw = at::empty({N, K}, x.options());
  check_launch(kernels::masked_linear_bwd_weight(dtype_of(x), matrix_ref(dy), matrix_ref(x),
                                                 bits.const_data_ptr<int32_t>(), dw.data_ptr(), M, N, K,
                                                 c10::cuda::getCurrentCUDAStream()),
               "masked_linear_bwd_weight");
  return dw;
}

// Fills masks; raises ValueError if a score tensor contains NaN (read back after the kernels).
void topk_mask(const std::vector<at::Tensor>& scores, const std::vector<int64_t>& group, const std::vector<int64_t>& ks,
               bool largest, std::vector<at::Tensor>& masks) {
  const c10::cuda::CUDAGuard guard(scores[0].device());
  const int64_t num_tensors = static_cast<int64_t>(scores.size()), num_groups = static_cast<int64_t>(ks.size());
  std::vector<kernels::TopkTensor> tensors(num_tensors);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const auto [rows, cols] = selection_view(scores[i]);
    tensors[i] = {scores[i].const_data_ptr(), rows, cols, masks[i].data_ptr<int32_t>(), group[i]};
  }
  const size_t bytes = kernels::topk_mask_workspace_bytes(tensors.data(), num_tensors, num_groups);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, scores[0].options().dtype(at::kByte));
  at::Tensor nan_flags = at::empty({num_tensors}, scores[0].options().dtype(at::kInt));
  check_launch(kernels::topk_mask(dtype_of(scores[0]), tensors.data(), num_tensors, ks.data(), num_groups, largest,
                                  workspace.data_ptr(), bytes, nan_flags.data_ptr<int32_t>(),
                                  c10::cuda::getCurrentCUDAStream()),
               "topk_mask");
  const at::Tensor flags = nan_flags.cpu();
  const int32_t* flag = flags.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (flag[i] != 0) raise_nan(i);
  }
}

}  // namespace cuda_path
#endif  // SPARSE_ENGINE_WITH_CUDA

at::Tensor pack_mask(const at::Tensor& mask) {
  constexpr const char* op = "pack_mask";
  check_device(mask, "mask", op);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be torch.bool, got ", mask.scalar_type());
  check_matrix(mask, "mask", op);
#ifdef SPARSE_ENGINE_WITH_CUDA
  if (mask.is_cuda()) return cuda_path::pack_mask(mask);
#endif
  const int64_t rows = mask.size(0), cols = mask.size(1);
  at::Tensor bits = at::empty({rows, mask_words(cols)}, mask.options().dtype(at::kInt));
  sparse_engine::cpu::pack_mask(static_cast<const uint8_t*>(mask.const_data_ptr()), rows, cols, mask.stride(0),
                                mask.stride(1), bits.data_ptr<int32_t>());
  return bits;
}

at::Tensor unpack_mask(const at::Tensor& mask_bits, int64_t cols) {
  constexpr const char* op = "unpack_mask";
  check_device(mask_bits, "mask_bits", op);
  TORCH_CHECK(cols >= 0, op, ": cols must be >= 0, got ", cols);
  TORCH_CHECK(mask_bits.scalar_type() == at::kInt, op, ": mask_bits must be int32 (as made by pack_mask), got ",
              mask_bits.scalar_type());
  TORCH_CHECK(mask_bits.dim() == 2 && mask_bits.size(1) == mask_words(cols), op,
              ": mask_bits must have shape (rows, ", mask_words(cols), ") for cols=", cols, ", got shape ",
              mask_bits.sizes());
  const at::Tensor bits = mask_bits.contiguous();
#ifdef SPARSE_ENGINE_WITH_CUDA
  if (bits.is_cuda()) return cuda_path::unpack_mask(bits, cols);
#endif
  at::Tensor mask = at::empty({bits.size(0), cols}, bits.options().dtype(at::kBool));
  sparse_engine::cpu::unpack_mask(bits.const_data_ptr<int32_t>(), bits.size(0), cols,
                                  static_cast<uint8_t*>(mask.data_ptr()));
  return mask;
}

// The checks of the CPU element-wise mask ops (CUDA tensors take the Triton kernels in kernels/mask_pack.py).
at::Tensor checked_elementwise(const at::Tensor& t, const at::Tensor& mask_bits, const char* op) {
  TORCH_CHECK(t.is_cpu(), op, ": t must be a CPU tensor, got one on ", t.device());
  check_matrix(t, "t", op);
  TORCH_CHECK(t.element_size() == 1 || t.element_size() == 2 || t.element_size() == 4 || t.element_size() == 8, op,
              ": t must have 1, 2, 4 or 8-byte elements, got ", t.scalar_type());
  TORCH_CHECK(!t.is_complex(), op, ": t must be a real tensor, got ", t.scalar_type());
  return checked_mask_bits(mask_bits, t, "t", t.size(0), t.size(1), op);
}

at::Tensor masked_copy(const at::Tensor& t, const at::Tensor& mask_bits) {
  const at::Tensor bits = checked_elementwise(t, mask_bits, "masked_copy");
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  sparse_engine::cpu::masked_copy(t.const_data_ptr(), t.element_size(), t.size(0), t.size(1), t.stride(0),
                                  t.stride(1), bits.const_data_ptr<int32_t>(), out.data_ptr());
  return out;
}

void apply_mask_(at::Tensor& t, const at::Tensor& mask_bits) {
  const at::Tensor bits = checked_elementwise(t, mask_bits, "apply_mask_");
  const int64_t rows = t.size(0), cols = t.size(1);
  sparse_engine::cpu::apply_mask(t.data_ptr(), t.element_size(), rows, cols, t.stride(0), t.stride(1),
                                 bits.const_data_ptr<int32_t>());
}

// ---- the op sparse_engine::masked_weight(weight, mask_bits) -> W*M ---------------------------------
// Registered here, in C++, rather than with torch.library.custom_op in Python: a Python custom op
// costs about 0.1 ms per call and per backward, more than the copy itself for most layers, and the
// masked dense route (sparse_engine.ops.dispatch) calls it once per layer per step and once per
// weight gradient. Its fake (meta) kernel and its CUDA kernel (Triton) are registered in
// sparse_engine/ops/masked_weight.py; the gradient is the same op on dW (exact zeros at pruned
// positions), through the dispatcher, so it is differentiable again.

at::Tensor masked_weight_call(const at::Tensor& weight, const at::Tensor& mask_bits) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sparse_engine::masked_weight", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(weight, mask_bits);
}

// The (rows, cols) view the packed mask packs: (shape[0], prod(shape[1:])), (1, numel) below rank 2.
at::Tensor as_selection_matrix(const at::Tensor& t) {
  if (t.dim() < 2) return t.reshape({1, t.numel()});
  return t.reshape({t.size(0), c10::multiply_integers(t.sizes().slice(1))});
}

at::Tensor masked_weight_cpu(const at::Tensor& weight, const at::Tensor& mask_bits) {
  return masked_copy(as_selection_matrix(weight), mask_bits.contiguous()).view(weight.sizes());
}

class MaskedWeightFunction : public torch::autograd::Function<MaskedWeightFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& mask_bits) {
    ctx->save_for_backward({mask_bits});
    at::AutoDispatchBelowADInplaceOrView guard;
    return masked_weight_call(weight, mask_bits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor mask_bits = ctx->get_saved_variables()[0];
    return {masked_weight_call(grads[0], mask_bits), at::Tensor()};
  }
};

at::Tensor masked_weight_autograd(const at::Tensor& weight, const at::Tensor& mask_bits) {
  return MaskedWeightFunction::apply(weight, mask_bits);
}

// ---- masked_weight_for_op(weight, mask_bits): W*M for a dense op, W itself where that is W*M ----
// The library's dense fallbacks (F.linear, F.conv*, torch's RNNs on W*M) read the masked weight once
// and never modify it. On the CPU, when a read-only pass finds every pruned entry already +0 or -0
// (what mask_optimizer keeps), W itself has the values of W*M: it is passed on without the copy, and
// its gradient is still masked (exact zeros at pruned positions). Otherwise, W*M as masked_weight.
// Eager only: the check reads the data (sparse_engine/ops/masked_weight.py decides when to call it).

bool pruned_are_zero(const at::Tensor& t, const at::Tensor& mask_bits) {
  constexpr const char* op = "pruned_are_zero";
  TORCH_CHECK(t.is_cpu(), op, ": t must be a CPU tensor, got one on ", t.device());
  check_float(t, "t", op);
  const at::Tensor m = as_selection_matrix(t);
  const at::Tensor bits = checked_mask_bits(mask_bits, m, "t", m.size(0), m.size(1), op);
  return sparse_engine::cpu::pruned_are_zero(m.const_data_ptr(), m.element_size(), m.size(0), m.size(1), m.stride(0),
                                             m.stride(1), bits.const_data_ptr<int32_t>());
}

// Whether grad, a gradient just handed to a node's backward, is seen by nothing else: besides the
// backward's own argument, the only reference to it is the node's list of inputs (CppNode passes
// backward a copy of it), and its storage is its own, or its base's when it is a view of a tensor
// that only it keeps alive (TBackward's `.t()` of a fresh matmul result). An add hands one tensor to
// both of its inputs, torch.autograd.grad captures the gradients it returns, a caller passes its own
// grad_outputs: each holds another reference, and then the gradient is not the node's to change.
bool sole_owner(const at::Tensor& grad) {
  if (grad.use_count() > 2) return false;
  if (grad.storage().use_count() == 1) return true;
  if (!grad.is_view()) return false;
  const at::TensorBase& base = grad._base();
  return base.use_count() == 1 && base.storage().use_count() == 2;
}

class MaskedGradFunction : public torch::autograd::Function<MaskedGradFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight,
                            const at::Tensor& mask_bits) {
    ctx->save_for_backward({mask_bits});
    return weight;  // autograd returns it as a view of weight
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor mask_bits = ctx->get_saved_variables()[0];
    at::Tensor grad = std::move(grads[0]);
    // Masked in place when nothing else sees it (as AccumulateGrad steals a gradient), unless a double
    // backward needs the masking itself to be differentiable; otherwise a masked copy.
    if (!at::GradMode::is_enabled() && grad.is_cpu() && grad.is_contiguous() && sole_owner(grad)) {
      at::Tensor m = as_selection_matrix(grad);
      apply_mask_(m, mask_bits);
      return {grad, at::Tensor()};
    }
    return {masked_weight_call(grad, mask_bits), at::Tensor()};
  }
};

at::Tensor masked_weight_for_op(const at::Tensor& weight, const at::Tensor& mask_bits) {
  const auto dtype = weight.scalar_type();
  const bool floating = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
  if (weight.is_cpu() && floating && pruned_are_zero(weight, mask_bits)) {
    return MaskedGradFunction::apply(weight, mask_bits);
  }
  return masked_weight_call(weight, mask_bits);
}


at::Tensor masked_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask_bits,
                             const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "masked_linear_fwd";
  check_device(x, "x", op);
  check_matrix(x, "x", op);
  check_matrix(weight, "weight", op);
  check_float(x, "x", op);
  check_same_dtype(weight, "weight", x, "x", op);
  check_same_device(weight, "weight", x, "x", op);
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, op, ": weight must have shape (N, ", K, ") for x of shape ", x.sizes(),
              ", got shape ", weight.sizes());
  const at::Tensor bits = checked_mask_bits(mask_bits, x, "x", N, K, op);
  if (bias.has_value()) {
    check_same_device(*bias, "bias", x, "x", op);
    check_same_dtype(*bias, "bias", x, "x", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got shape ",
                bias->sizes());
  }
#ifdef SPARSE_ENGINE_WITH_CUDA
  if (x.is_cuda()) return cuda_path::masked_linear_fwd(x, weight, bits, bias);
#endif
  return sparse_engine::cpu::masked_linear_fwd(x, weight, bits, bias);
}

at::Tensor masked_linear_bwd_input(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& mask_bits) {
  constexpr const char* op = "masked_linear_bwd_input";
  check_device(dy, "dy", op);
  check_matrix(dy, "dy", op);
  check_matrix(weight, "weight", op);
  check_float(dy, "dy", op);
  check_same_dtype(weight, "weight", dy, "dy", op);
  check_same_device(weight, "weight", dy, "dy", op);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(dy.size(1) == N, op, ": dy must have shape (M, ", N, ") for weight of shape ", weight.sizes(),
              ", got shape ", dy.sizes());
  const at::Tensor bits = checked_mask_bits(mask_bits, dy, "dy", N, K, op);
#ifdef SPARSE_ENGINE_WITH_CUDA
  if (dy.is_cuda()) return cuda_path::masked_linear_bwd_input(dy, weight, bits);
#endif
  return sparse_engine::cpu::masked_linear_bwd_input(dy, weight, bits);
}

at::Tensor masked_linear_bwd_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mask_bits) {
  constexpr const char* op = "masked_linear_bwd_weight";
  check_device(dy, "dy", op);
  check_matrix(dy, "dy", op);
  check_matrix(x, "x", op);
  check_float(x, "x", op);
  check_same_dtype(dy, "dy", x, "x", op);
  check_same_device(x, "x", dy, "dy", op);
  TORCH_CHECK(x.size(0) == dy.size(0), op, ": x and dy must have the same number of rows, got shapes ", x.sizes(),
              " and ", dy.sizes());
  const int64_t N = dy.size(1), K = x.size(1);
  const at::Tensor bits = checked_mask_bits(mask_bits, dy, "dy", N, K, op);
#ifdef SPARSE_ENGINE_WITH_CUDA
  if (dy.is_cuda()) return cuda_path::masked_linear_bwd_weight(dy, x, bits);
#endif
  return sparse_engine::cpu::masked_linear_bwd_weight(dy, x, bits);
}

std::vector<at::Tensor> topk_mask(const std::vector<at::Tensor>& scores, const std::vector<int64_t>& group,
                                  const std::vector<int64_t>& ks, bool largest) {
  constexpr const char* op = "topk_mask";
  const int64_t num_tensors = static_cast<int64_t>(scores.size()), num_groups = static_cast<int64_t>(ks.size());
  TORCH_CHECK_VALUE(group.size() == scores.size(), op, ": group must have one entry per score tensor (",
                    num_tensors, "), got ", group.size());
  std::vector<int64_t> sizes(num_groups, 0);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const at::Tensor& s = scores[i];
    const std::string name = "scores[" + std::to_string(i) + "]";
    check_device(s, name.c_str(), op);
    const auto dtype = s.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
                " must be float32, float16 or bfloat16, got ", dtype);
    check_same_dtype(s, name.c_str(), scores[0], "scores[0]", op);
    check_same_device(s, name.c_str(), scores[0], "scores[0]", op);
    TORCH_CHECK(s.is_contiguous(), op, ": ", name, " must be contiguous");
    TORCH_CHECK_VALUE(group[i] >= 0 && group[i] < num_groups, op, ": group[", i, "] must be in [0, ", num_groups,
                      ") (one k per group), got ", group[i]);
    sizes[group[i]] += s.numel();
  }
  for (int64_t g = 0; g < num_groups; ++g) {
    TORCH_CHECK_VALUE(ks[g] >= 0 && ks[g] <= sizes[g], op, ": ks[", g, "] must be in [0, ", sizes[g],
                      "] (the number of scores in group ", g, "), got ", ks[g]);
  }
  std::vector<at::Tensor> masks;
  masks.reserve(num_tensors);
  for (const at::Tensor& s : scores) {
    const auto [rows, cols] = selection_view(s);
    masks.push_back(at::empty({rows, mask_words(cols)}, s.options().dtype(at::kInt)));
  }
  if (num_tensors == 0) return masks;
#ifdef SPARSE_ENGINE_WITH_CUDA
  if (scores[0].is_cuda()) {
    cuda_path::topk_mask(scores, group, ks, largest, masks);
    return masks;
  }
#endif
  namespace kernels = sparse_engine::cpu;
  const auto dtype = scores[0].scalar_type();
  const kernels::ScoreType score_type = dtype == at::kFloat ? kernels::ScoreType::kFloat32
                                        : dtype == at::kHalf ? kernels::ScoreType::kFloat16
                                                             : kernels::ScoreType::kBFloat16;
  std::vector<kernels::TopkTensor> tensors(num_tensors);
  for (int64_t i = 0; i < num_tensors; ++i) {
    const auto [rows, cols] = selection_view(scores[i]);
    tensors[i] = {scores[i].const_data_ptr(), rows, cols, masks[i].data_ptr<int32_t>(), group[i]};
  }
  const int64_t nan_tensor = kernels::topk_mask(score_type, tensors.data(), num_tensors, ks.data(), num_groups, largest);
  if (nan_tensor >= 0) raise_nan(nan_tensor);
  return masks;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_engine, m) {
  // Where the Python registrations (fake kernel, CUDA kernel) live, imported on first need.
  m.set_python_module("sparse_engine.ops.masked_weight");
  m.def("masked_weight(Tensor weight, Tensor mask_bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparse_engine, CPU, m) { m.impl("masked_weight", &masked_weight_cpu); }

TORCH_LIBRARY_IMPL(sparse_engine, Autograd, m) { m.impl("masked_weight", &masked_weight_autograd); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_engine's compiled kernels: mask bit packing, masked_linear and topk_mask, on CPU (OpenMP) and CUDA.";
  // The kernels touch no Python objects, so other Python threads may run meanwhile.
  using release_gil = py::call_guard<py::gil_scoped_release>;

  m.def("pack_mask", &pack_mask, release_gil(), py::arg("mask"),
        "pack_mask(mask: bool (R, C), any strides) -> int32 (R, ceil(C / 32)), on mask's device.");
  m.def("unpack_mask", &unpack_mask, release_gil(), py::arg("mask_bits"), py::arg("cols"),
        "unpack_mask(mask_bits: int32 (R, ceil(cols / 32)), cols: int) -> bool (R, cols).");
  m.def("apply_mask_", &apply_mask_, release_gil(), py::arg("t"), py::arg("mask_bits"),
        "apply_mask_(t: CPU (R, C) any strides, mask_bits: int32 (R, ceil(C / 32))): pruned elements of t set to 0.");
  m.def("masked_copy", &masked_copy, release_gil(), py::arg("t"), py::arg("mask_bits"),
        "masked_copy(t: CPU (R, C) any strides, mask_bits: int32 (R, ceil(C / 32))) -> contiguous t * M.");
  m.def("pruned_are_zero", &pruned_are_zero, release_gil(), py::arg("t"), py::arg("mask_bits"),
        "pruned_are_zero(t: CPU float tensor, mask_bits: its packed mask) -> True if every pruned element is +0 or -0.");
  m.def("masked_weight_for_op", &masked_weight_for_op, py::arg("weight"), py::arg("mask_bits"),
        "masked_weight_for_op(weight, mask_bits) -> W*M for a dense op that reads it once and never modifies it: "
        "on the CPU, weight itself (a view, gradient masked) when its pruned entries are zeros, else masked_weight.");
  m.def("masked_linear_fwd", &masked_linear_fwd, release_gil(), py::arg("x"), py::arg("weight"),
        py::arg("mask_bits"), py::arg("bias") = py::none(),
        "masked_linear_fwd(x (M, K), weight (N, K), mask_bits (N, ceil(K / 32)), bias (N,) or None) -> "
        "x @ (W*M)^T + bias, (M, N), dtype of x.");
  m.def("masked_linear_bwd_input", &masked_linear_bwd_input, release_gil(), py::arg("dy"), py::arg("weight"),
        py::arg("mask_bits"),
        "masked_linear_bwd_input(dy (M, N), weight (N, K), mask_bits (N, ceil(K / 32))) -> dy @ (W*M), (M, K).");
  m.def("masked_linear_bwd_weight", &masked_linear_bwd_weight, release_gil(), py::arg("dy"), py::arg("x"),
        py::arg("mask_bits"),
        "masked_linear_bwd_weight(dy (M, N), x (M, K), mask_bits (N, ceil(K / 32))) -> (dy^T @ x) * M, (N, K), "
        "pruned entries exact zeros.");
  m.def("topk_mask", &topk_mask, release_gil(), py::arg("scores"), py::arg("group"), py::arg("ks"),
        py::arg("largest"),
        "topk_mask(scores: list of contiguous float32/float16/bfloat16 tensors on one device, group: one group "
        "index per tensor, ks: one k per group, largest: bool) -> list of int32 packed masks (rows, ceil(cols / 32)) "
        "keeping exactly ks[g] scores of each group g (ties: lower tensor index, then flat index, first). "
        "ValueError if a score is NaN.");
  m.def("cuda_built", [] { return kCudaBuilt; }, "True if the CUDA kernels were compiled into this build.");
}
