// CUDA skinny_linear: cuBLAS. On the GPU the vendor GEMV/GEMM paths already stream the weights at
// close to peak bandwidth for a few rows, so the op forwards to at::linear; it exists on CUDA so that
// one op (and one torch.compile / CUDA-graph trace) serves both devices.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>

#include <vector>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear/skinny_linear_checks.h"

namespace lcm_fast {
namespace {

void check_no_int8(const at::Tensor& weight) {
  TORCH_CHECK(!is_packed_int8(weight), "skinny_linear: packed int8 weights have no CUDA kernel yet "
              "(lcm_fast.ops.skinny_linear runs them through the reference, which dequantizes them)");
}

at::Tensor skinny_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_skinny_linear_args(x, weight, bias);
  check_no_int8(weight);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, weight, bias);
}

// composed: one cuBLAS call per weight, then the cat or the SwiGLU product
at::Tensor skinny_linear_multi_cuda(const at::Tensor& x, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases, bool glu) {
  check_skinny_linear_multi_args(x, weights, biases, glu);
  for (const at::Tensor& w : weights) check_no_int8(w);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < weights.size(); ++i) ys.push_back(at::linear(x, weights[i], biases.get(i)));
  return glu ? at::mul(at::silu(ys[0]), ys[1]) : at::cat(ys, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CUDA, m) {
  m.impl("skinny_linear", &skinny_linear_cuda);
  m.impl("skinny_linear_multi", &skinny_linear_multi_cuda);
}

}  // namespace lcm_fast
