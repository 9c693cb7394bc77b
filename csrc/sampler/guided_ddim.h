// Fused guided DDIM step: the whole per-step chain of the official Two-Tower sampler in one pass per
// row. Shared by the CPU and CUDA implementations; this header is torch-free (nvcc compiles it fast).
//
// Notation (DDIM paper Eqs. 12 and 16): a_t = alpha-bar_t, b_t = 1 - a_t, x the current latent,
// x0 the predicted clean sample, eps the predicted noise, sigma the eta noise scale.
#pragma once

#include <cstdint>

namespace lcm_fast {

// Per-step coefficients: one row of the scheduler's device table (fp32).
enum Coef : int {
  kSqrtAlpha = 0,       // sqrt(a_t)
  kSqrtBeta = 1,        // sqrt(1 - a_t)
  kSqrtAlphaPrev = 2,   // sqrt(a_prev)
  kDirection = 3,       // sqrt(1 - a_prev - sigma^2)
  kSigma = 4,           // eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
  kFirstStep = 5,       // 1: t = T-1 under CFG, step on the conditional prediction without guidance
  kNumCoefs = 6,
};

// Generation constants (fp32).
enum Param : int {
  kGuidanceScale = 0,   // w
  kRescale = 1,         // phi
  kOneMinusRescale = 2, // 1 - phi, rounded once from double as the official code does
  kEpsilonScaling = 3,  // eps is divided by this after x0 is formed (1: off)
  kClipNoise = 4,       // |x_prev| <= clip_noise
  kClipSample = 5,      // |x0| <= clip_sample_range (inf: off)
  kNumParams = 6,
};

enum PredictionType : int { kSample = 0, kEpsilon = 1, kVPrediction = 2 };

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// CUDA launcher (guided_ddim_cuda.cu). Rows: latents/pred_x0/noise [B, D], model_out [(cfg ? 2 : 1) * B, D],
// all contiguous with the same dtype; coef [kNumCoefs], params [kNumParams] fp32 on the device.
// D <= kMaxCudaDim. Launched on `stream` (a cudaStream_t).
constexpr int64_t kMaxCudaDim = 8192;
void launch_guided_ddim_step(void* latents, void* pred_x0, const void* model_out, const float* coef,
                             const float* params, const void* noise, int64_t rows, int64_t dim, bool cfg,
                             int prediction_type, DType dtype, void* stream);

}  // namespace lcm_fast
