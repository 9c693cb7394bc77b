// CUDA skinny_linear: cuBLAS. On the GPU the vendor GEMV/GEMM paths already stream the weights at
// close to peak bandwidth for a few rows, so the op forwards to at::linear; it exists on CUDA so that
// one op (and one torch.compile / CUDA-graph trace) serves both devices.
#include <ATen/core/Tensor.h>
#include <ATen/ops/linear.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linear/skinny_linear_checks.h"

namespace lcm_fast {
namespace {

at::Tensor skinny_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_skinny_linear_args(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CUDA, m) { m.impl("skinny_linear", &skinny_linear_cuda); }

}  // namespace lcm_fast
