// Fused AdaLN ops of the Two-Tower denoiser (torch-free header shared by CPU and CUDA code).
//
//   norm_modulate:                y = norm(x) * (1 + scale) + shift
//   gated_residual_norm_modulate: r = residual + gate * branch;  y = norm(r) * (1 + scale) + shift
//
// norm is LayerNorm ((x - mean) * rstd [* weight] [+ bias]) or RMSNorm (x * rstd [* weight]),
// rstd = 1 / sqrt(var + eps) (LayerNorm) or 1 / sqrt(mean(x^2) + eps) (RMSNorm), always in fp32.
// Rows are the flattened leading dims: every activation is [N, D], contiguous, one dtype; the modulations
// (gate, shift, scale) are [N, D] too (mod_stride D) or one [D] row for every row (mod_stride 0: a decoding step's
// timestep modulation, never expanded into a copy); weight and bias are fp32 [D] (or null).
#pragma once

#include <cstdint>

#include "sampler/guided_ddim.h"  // DType

namespace lcm_fast {

constexpr int64_t kMaxAdaLNCudaDim = 8192;

// Forward. residual/branch/gate null: plain norm_modulate of `x`; else x is ignored and r is also
// written to `residual_out`. Writes y.
void launch_adaln_forward(const void* x, const void* residual, const void* branch, const void* gate, const void* shift,
                          const void* scale, int64_t mod_stride, const float* weight, const float* bias,
                          void* residual_out, void* y, int64_t rows, int64_t dim, bool rms, float eps, DType dtype,
                          void* stream);

// The CPU implementation of launch_adaln_forward (stream unused); also called by the fused denoiser layer.
void adaln_forward_cpu(const void* x, const void* residual, const void* branch, const void* gate, const void* shift,
                       const void* scale, int64_t mod_stride, const float* weight, const float* bias,
                       void* residual_out, void* y, int64_t rows, int64_t dim, bool rms, float eps, DType dtype,
                       void* stream);

// Backward of y = norm(x) * (1 + scale) + shift w.r.t. x, scale (per element) and weight, bias
// (fp32 [D], accumulated: zero them first). grad_shift is grad_y itself.
void launch_adaln_backward(const void* grad_y, const void* x, const void* scale, const float* weight,
                           const float* bias, void* grad_x, void* grad_scale, float* grad_weight, float* grad_bias,
                           int64_t rows, int64_t dim, bool rms, float eps, DType dtype, void* stream);

}  // namespace lcm_fast
