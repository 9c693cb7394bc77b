// Host bindings of the CUDA AdaLN ops (compiled by the C++ compiler; the kernels are in the .cu).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adaln/adaln.h"
#include "adaln/adaln_host.h"

namespace lcm_fast {
namespace {

void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_dim(const at::Tensor& t) {
  TORCH_CHECK(t.size(-1) <= kMaxAdaLNCudaDim, "adaln ops: the CUDA kernels support D <= ", kMaxAdaLNCudaDim, ", got ",
              t.size(-1));
}

void cuda_forward(const void* x, const void* residual, const void* branch, const void* gate, const void* shift,
                  const void* scale, int64_t mod_stride, const float* weight, const float* bias, void* residual_out,
                  void* y, int64_t rows, int64_t dim, bool rms, float eps, DType dtype, void* stream) {
  launch_adaln_forward(x, residual, branch, gate, shift, scale, mod_stride, weight, bias, residual_out, y, rows, dim,
                       rms, eps, dtype, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_backward(const void* grad_y, const void* x, const void* scale, const float* weight, const float* bias,
                   void* grad_x, void* grad_scale, float* grad_weight, float* grad_bias, int64_t rows, int64_t dim,
                   bool rms, float eps, DType dtype, void* stream) {
  launch_adaln_backward(grad_y, x, scale, weight, bias, grad_x, grad_scale, grad_weight, grad_bias, rows, dim, rms, eps,
                        dtype, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor norm_modulate_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool rms,
                              double eps) {
  check_dim(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return adaln_norm_modulate_host(cuda_forward, x, shift, scale, weight, bias, rms, eps, current_stream());
}

std::tuple<at::Tensor, at::Tensor> gated_residual_norm_modulate_cuda(
    const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool rms,
    double eps) {
  check_dim(residual);
  const c10::cuda::CUDAGuard guard(residual.device());
  return adaln_gated_residual_norm_modulate_host(cuda_forward, residual, branch, gate, shift, scale, weight, bias, rms,
                                                 eps, current_stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool rms, double eps) {
  check_dim(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return adaln_norm_modulate_backward_host(cuda_backward, grad_y, x, scale, weight, bias, rms, eps, current_stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CUDA, m) {
  m.impl("adaln_norm_modulate", &norm_modulate_cuda);
  m.impl("adaln_gated_residual_norm_modulate", &gated_residual_norm_modulate_cuda);
  m.impl("adaln_norm_modulate_backward", &norm_modulate_backward_cuda);
}

}  // namespace lcm_fast
