// Host binding of the CUDA guided DDIM step (compiled by the C++ compiler; the kernel is in the .cu).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "sampler/guided_ddim.h"
#include "sampler/sampler_checks.h"

namespace lcm_fast {
namespace {

void guided_ddim_step_cuda(at::Tensor& latents, at::Tensor& pred_x0, const at::Tensor& model_out,
                           const at::Tensor& coef, const at::Tensor& params, const std::optional<at::Tensor>& noise,
                           int64_t prediction_type) {
  const bool cfg = check_guided_ddim_args(latents, pred_x0, model_out, coef, params, noise, prediction_type);
  TORCH_CHECK(coef.device() == latents.device() && params.device() == latents.device(),
              "guided_ddim_step_: coef and params must be on ", latents.device(), " (the coefficient table lives on the device)");
  TORCH_CHECK(latents.size(1) <= kMaxCudaDim, "guided_ddim_step_: CUDA kernel supports D <= ", kMaxCudaDim, ", got ",
              latents.size(1));
  DType dtype;
  switch (latents.scalar_type()) {
    case at::kFloat: dtype = DType::kFloat32; break;
    case at::kBFloat16: dtype = DType::kBFloat16; break;
    case at::kHalf: dtype = DType::kFloat16; break;
    default: TORCH_CHECK(false, "guided_ddim_step_: unsupported dtype ", latents.scalar_type(), " (float32, bfloat16, float16)");
  }
  const c10::cuda::CUDAGuard guard(latents.device());
  launch_guided_ddim_step(latents.data_ptr(), pred_x0.data_ptr(), model_out.const_data_ptr(),
                          coef.const_data_ptr<float>(), params.const_data_ptr<float>(),
                          noise ? noise->const_data_ptr() : nullptr, latents.size(0), latents.size(1), cfg,
                          static_cast<int>(prediction_type), dtype, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CUDA, m) { m.impl("guided_ddim_step_", &guided_ddim_step_cuda); }

}  // namespace lcm_fast
