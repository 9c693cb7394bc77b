// Argument checks of guided_ddim_step_, shared by the CPU and CUDA host code (includes torch headers:
// never include from a .cu file).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "sampler/guided_ddim.h"

namespace lcm_fast {

// Returns whether model_out holds both CFG halves ([2B, D]) or one ([B, D]).
inline bool check_guided_ddim_args(const at::Tensor& latents, const at::Tensor& pred_x0, const at::Tensor& model_out,
                                   const at::Tensor& coef, const at::Tensor& params,
                                   const std::optional<at::Tensor>& noise, int64_t prediction_type) {
  TORCH_CHECK(latents.dim() == 2, "guided_ddim_step_: latents must be [B, D], got ", latents.sizes());
  const int64_t B = latents.size(0), D = latents.size(1);
  TORCH_CHECK(pred_x0.sizes() == latents.sizes(), "guided_ddim_step_: pred_x0 ", pred_x0.sizes(), " must match latents ",
              latents.sizes());
  TORCH_CHECK(model_out.dim() == 2 && model_out.size(1) == D && (model_out.size(0) == B || model_out.size(0) == 2 * B),
              "guided_ddim_step_: model_out must be [B, D] or [2B, D] with B=", B, ", D=", D, "; got ", model_out.sizes());
  for (const at::Tensor* t : {&latents, &pred_x0, &model_out}) {
    TORCH_CHECK(t->is_contiguous(), "guided_ddim_step_: latents, pred_x0 and model_out must be contiguous");
    TORCH_CHECK(t->scalar_type() == latents.scalar_type() && t->device() == latents.device(),
                "guided_ddim_step_: latents, pred_x0, model_out (and noise) need one dtype and device");
  }
  if (noise) {
    TORCH_CHECK(noise->sizes() == latents.sizes() && noise->is_contiguous() &&
                    noise->scalar_type() == latents.scalar_type() && noise->device() == latents.device(),
                "guided_ddim_step_: noise must be a contiguous [B, D] tensor like latents, got ", noise->sizes());
  }
  TORCH_CHECK(coef.dim() == 1 && coef.numel() == kNumCoefs && coef.scalar_type() == at::kFloat && coef.is_contiguous(),
              "guided_ddim_step_: coef must be a contiguous float32 [", int(kNumCoefs), "] tensor, got ", coef.sizes());
  TORCH_CHECK(params.dim() == 1 && params.numel() == kNumParams && params.scalar_type() == at::kFloat &&
                  params.is_contiguous(),
              "guided_ddim_step_: params must be a contiguous float32 [", int(kNumParams), "] tensor, got ", params.sizes());
  TORCH_CHECK(prediction_type >= kSample && prediction_type <= kVPrediction,
              "guided_ddim_step_: prediction_type must be 0 (sample), 1 (epsilon) or 2 (v_prediction)");
  return model_out.size(0) == 2 * B && B > 0;
}

}  // namespace lcm_fast
