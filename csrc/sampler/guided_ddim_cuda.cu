// CUDA implementation of the fused guided DDIM step (torch-free: raw pointers and a stream).
//
// One block per row (D <= kMaxCudaDim). Each thread keeps its elements in registers across the three
// phases: (1) epsilon of both CFG halves and the guided combination, block sums for the means;
// (2) squared deviations, block sums for the rescale ratio (two-pass moments); (3) x0, epsilon
// scaling, clips and the DDIM update. Loads/stores are 128-bit when the row allows it.
#include <cmath>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "sampler/guided_ddim.h"

namespace lcm_fast {
namespace {

constexpr int kThreads = kBlockThreads;
constexpr int kElemsPerThread = kMaxCudaDim / kThreads;  // 32

// eps implied by a model output under the prediction type (official get_epsilon).
template <int PT>
__device__ __forceinline__ float to_eps(float out, float x, float sa, float sb) {
  if constexpr (PT == kSample) return (x - sa * out) / sb;
  else if constexpr (PT == kEpsilon) return out;
  else return sa * out + sb * x;
}

template <typename T, int VEC, int PT, bool CFG>
__global__ void __launch_bounds__(kThreads) guided_ddim_step_kernel(
    T* __restrict__ latents, T* __restrict__ pred_x0, const T* __restrict__ model_out, const float* __restrict__ coef,
    const float* __restrict__ params, const T* __restrict__ noise, int64_t rows, int64_t dim) {
  constexpr int kItems = kElemsPerThread / VEC;  // vectors per thread
  const int64_t row = blockIdx.x;
  const float sa = coef[kSqrtAlpha], sb = coef[kSqrtBeta], sap = coef[kSqrtAlphaPrev];
  const float direction = coef[kDirection], sigma = coef[kSigma];
  const float scaling = params[kEpsilonScaling], clip_noise = params[kClipNoise], clip_sample = params[kClipSample];
  const bool guided = CFG && coef[kFirstStep] == 0.f;  // uniform over the block
  const T* x_row = latents + row * dim;
  const T* cond_row = model_out + row * dim;
  const T* uncond_row = model_out + (rows + row) * dim;

  float g[kElemsPerThread];  // guided epsilon of this thread's elements
  float factor = 1.f;
  if (guided) {
    float ec[kElemsPerThread];
    const float w = params[kGuidanceScale];
    float sum_c = 0.f, sum_g = 0.f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
      if (i < dim) {
        float x[VEC], oc[VEC], ou[VEC];
        load<T, VEC>(x_row + i, x);
        load<T, VEC>(cond_row + i, oc);
        load<T, VEC>(uncond_row + i, ou);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float c = to_eps<PT>(oc[j], x[j], sa, sb), u = to_eps<PT>(ou[j], x[j], sa, sb);
          ec[k * VEC + j] = c;
          g[k * VEC + j] = u + w * (c - u);
          sum_c += c;
          sum_g += g[k * VEC + j];
        }
      }
    }
    block_sum2(sum_c, sum_g);
    const float mean_c = sum_c / dim, mean_g = sum_g / dim;
    float ss_c = 0.f, ss_g = 0.f;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
      if (i < dim) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float dc = ec[k * VEC + j] - mean_c, dg = g[k * VEC + j] - mean_g;
          ss_c += dc * dc;
          ss_g += dg * dg;
        }
      }
    }
    block_sum2(ss_c, ss_g);
    // std(eps_c) / std(g): Bessel's correction cancels in the ratio
    factor = params[kRescale] * (sqrtf(ss_c) / sqrtf(ss_g)) + params[kOneMinusRescale];
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
    if (i < dim) {
      float x[VEC], prev[VEC], x0[VEC], z[VEC];
      load<T, VEC>(x_row + i, x);
      if (!guided) load<T, VEC>(cond_row + i, z);  // z: the (conditional) model output
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float eps, x0j;
        if (guided) {
          eps = factor * g[k * VEC + j];
          x0j = (x[j] - sb * eps) / sa;
        } else if constexpr (PT == kSample) {
          x0j = z[j];
          eps = (x[j] - sa * z[j]) / sb;
        } else if constexpr (PT == kEpsilon) {
          x0j = (x[j] - sb * z[j]) / sa;
          eps = z[j];
        } else {
          x0j = sa * x[j] - sb * z[j];
          eps = sa * z[j] + sb * x[j];
        }
        eps = eps / scaling;  // after x0: only the direction term is affected
        x0[j] = clamp_nan(x0j, -clip_sample, clip_sample);
        prev[j] = sap * x0[j] + direction * eps;
      }
      if (noise != nullptr) {
        load<T, VEC>(noise + row * dim + i, z);
#pragma unroll
        for (int j = 0; j < VEC; ++j) prev[j] += sigma * z[j];
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) prev[j] = clamp_nan(prev[j], -clip_noise, clip_noise);
      store<T, VEC>(latents + row * dim + i, prev);
      store<T, VEC>(pred_x0 + row * dim + i, x0);
    }
  }
}

template <typename T, int VEC>
void launch_typed(void* latents, void* pred_x0, const void* model_out, const float* coef, const float* params,
                  const void* noise, int64_t rows, int64_t dim, bool cfg, int pt, cudaStream_t stream) {
  const int64_t vectors = (dim + VEC - 1) / VEC;
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, ((vectors + 31) / 32) * 32));
  auto* lat = static_cast<T*>(latents);
  auto* x0 = static_cast<T*>(pred_x0);
  const auto* out = static_cast<const T*>(model_out);
  const auto* z = static_cast<const T*>(noise);
#define LCM_FAST_LAUNCH(PT_, CFG_) \
  guided_ddim_step_kernel<T, VEC, PT_, CFG_><<<rows, threads, 0, stream>>>(lat, x0, out, coef, params, z, rows, dim)
  switch (pt * 2 + (cfg ? 1 : 0)) {
    case kSample * 2: LCM_FAST_LAUNCH(kSample, false); break;
    case kSample * 2 + 1: LCM_FAST_LAUNCH(kSample, true); break;
    case kEpsilon * 2: LCM_FAST_LAUNCH(kEpsilon, false); break;
    case kEpsilon * 2 + 1: LCM_FAST_LAUNCH(kEpsilon, true); break;
    case kVPrediction * 2: LCM_FAST_LAUNCH(kVPrediction, false); break;
    default: LCM_FAST_LAUNCH(kVPrediction, true); break;
  }
#undef LCM_FAST_LAUNCH
}

template <typename T>
void launch_dtype(void* latents, void* pred_x0, const void* model_out, const float* coef, const float* params,
                  const void* noise, int64_t rows, int64_t dim, bool cfg, int pt, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorised = dim % kVec == 0 && aligned16(latents) && aligned16(pred_x0) && aligned16(model_out) &&
                          aligned16(noise);
  if (vectorised) {
    launch_typed<T, kVec>(latents, pred_x0, model_out, coef, params, noise, rows, dim, cfg, pt, stream);
  } else {
    launch_typed<T, 1>(latents, pred_x0, model_out, coef, params, noise, rows, dim, cfg, pt, stream);
  }
}

}  // namespace

void launch_guided_ddim_step(void* latents, void* pred_x0, const void* model_out, const float* coef,
                             const float* params, const void* noise, int64_t rows, int64_t dim, bool cfg,
                             int prediction_type, DType dtype, void* stream) {
  if (rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      launch_dtype<float>(latents, pred_x0, model_out, coef, params, noise, rows, dim, cfg, prediction_type, s);
      break;
    case DType::kBFloat16:
      launch_dtype<__nv_bfloat16>(latents, pred_x0, model_out, coef, params, noise, rows, dim, cfg, prediction_type, s);
      break;
    case DType::kFloat16:
      launch_dtype<__half>(latents, pred_x0, model_out, coef, params, noise, rows, dim, cfg, prediction_type, s);
      break;
  }
}

}  // namespace lcm_fast
