// The lcm_fast operator namespace. Every schema is declared here, once, with one comment per op;
// implementations live in csrc/<op family>/ as TORCH_LIBRARY_IMPL(lcm_fast, CPU|CUDA, m) blocks.
// Python adds only register_fake / register_autograd (python/lcm_fast/ops/).
//
// Loading lcm_fast._C runs this static registrar, so torch.ops.lcm_fast.* exist from then on.
#include <torch/library.h>

TORCH_LIBRARY(lcm_fast, m) {
  // One fused DDIM step of the Two-Tower sampler, in place: latents [B, D] <- clip(x_prev),
  // pred_x0 [B, D] <- x0. model_out is [2B, D] (CFG: conditional rows, then unconditional) or [B, D];
  // coef [6] is the step's row of the scheduler's coefficient table, params [6] the generation
  // constants (see csrc/sampler/guided_ddim.h); noise [B, D] is the eta noise (None when eta = 0).
  m.def("guided_ddim_step_(Tensor(a!) latents, Tensor(b!) pred_x0, Tensor model_out, Tensor coef, Tensor params, "
        "Tensor? noise, int prediction_type) -> ()");
}
