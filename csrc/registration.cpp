// The lcm_fast operator namespace. Every schema is declared here, once, with one comment per op;
// implementations live in csrc/<op family>/ as TORCH_LIBRARY_IMPL(lcm_fast, CPU|CUDA, m) blocks.
// Python adds only register_fake / register_autograd (python/lcm_fast/ops/).
//
// Loading lcm_fast._C runs this static registrar, so torch.ops.lcm_fast.* exist from then on.
// The op families (AdaLN denoiser step, guided DDIM step, RVQ) register their schemas here as they land.
#include <torch/library.h>

TORCH_LIBRARY(lcm_fast, m) {
  (void)m;
}
