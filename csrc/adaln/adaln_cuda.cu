// CUDA implementation of the AdaLN ops (torch-free: raw pointers and a stream).
//
// One block per row (D <= kMaxAdaLNCudaDim); each thread keeps its elements in registers between the
// statistics (two-pass moments, block reductions) and the fused output. The backward accumulates the
// weight/bias gradients with fp32 atomics into [D] buffers.
#include <cmath>
#include <cstdint>

#include "adaln/adaln.h"
#include "common/cuda_utils.cuh"

namespace lcm_fast {
namespace {

constexpr int kElems = kMaxAdaLNCudaDim / kBlockThreads;  // elements per thread, at most

// (mean, rstd) of the thread-held elements v[] of a row; every thread gets them.
template <int VEC>
__device__ __forceinline__ void row_stats(const float* v, int64_t dim, bool rms, float eps, float& mean, float& rstd) {
  constexpr int kItems = kElems / VEC;
  float s = 0.f, unused = 0.f;
  if (!rms) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if ((threadIdx.x + int64_t(k) * blockDim.x) * VEC < dim) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) s += v[k * VEC + j];
      }
    }
    block_sum2(s, unused);
  }
  mean = rms ? 0.f : s / dim;
  float ss = 0.f;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if ((threadIdx.x + int64_t(k) * blockDim.x) * VEC < dim) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += (v[k * VEC + j] - mean) * (v[k * VEC + j] - mean);
    }
  }
  unused = 0.f;
  block_sum2(ss, unused);
  rstd = rsqrtf(ss / dim + eps);
}

template <typename T, int VEC, bool GATED>
__global__ void __launch_bounds__(kBlockThreads) adaln_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ branch, const T* __restrict__ gate,
    const T* __restrict__ shift, const T* __restrict__ scale, int64_t mod_stride, const float* __restrict__ weight,
    const float* __restrict__ bias, T* __restrict__ residual_out, T* __restrict__ y, int64_t dim, bool rms,
    float eps) {
  constexpr int kItems = kElems / VEC;
  const int64_t base = int64_t(blockIdx.x) * dim, mod = int64_t(blockIdx.x) * mod_stride;
  float v[kElems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
    if (i < dim) {
      if constexpr (GATED) {  // r = residual + gate * branch
        float res[VEC], br[VEC], g[VEC];
        load<T, VEC>(residual + base + i, res);
        load<T, VEC>(branch + base + i, br);
        load<T, VEC>(gate + mod + i, g);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[k * VEC + j] = res[j] + g[j] * br[j];
        store<T, VEC>(residual_out + base + i, v + k * VEC);
      } else {
        load<T, VEC>(x + base + i, v + k * VEC);
      }
    }
  }
  float mean, rstd;
  row_stats<VEC>(v, dim, rms, eps, mean, rstd);
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
    if (i < dim) {
      float sh[VEC], sc[VEC], out[VEC];
      load<T, VEC>(shift + mod + i, sh);
      load<T, VEC>(scale + mod + i, sc);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float n = (v[k * VEC + j] - mean) * rstd;
        if (weight != nullptr) n *= weight[i + j];
        if (bias != nullptr) n += bias[i + j];
        out[j] = n * (1.f + sc[j]) + sh[j];
      }
      store<T, VEC>(y + base + i, out);
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads) adaln_backward_kernel(
    const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ scale, const float* __restrict__ weight,
    const float* __restrict__ bias, T* __restrict__ grad_x, T* __restrict__ grad_scale, float* __restrict__ grad_weight,
    float* __restrict__ grad_bias, int64_t dim, bool rms, float eps) {
  constexpr int kItems = kElems / VEC;
  const int64_t base = int64_t(blockIdx.x) * dim;
  float xh[kElems], dxh[kElems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if ((threadIdx.x + int64_t(k) * blockDim.x) * VEC < dim) {
      load<T, VEC>(x + base + (threadIdx.x + int64_t(k) * blockDim.x) * VEC, xh + k * VEC);
    }
  }
  float mean, rstd;
  row_stats<VEC>(xh, dim, rms, eps, mean, rstd);
  float c1 = 0.f, c2 = 0.f;  // sums of dxhat and dxhat * xhat
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
    if (i < dim) {
      float g[VEC], sc[VEC], dsc[VEC];
      load<T, VEC>(grad_y + base + i, g);
      load<T, VEC>(scale + base + i, sc);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const int e = k * VEC + j;
        xh[e] = (xh[e] - mean) * rstd;
        const float w = weight != nullptr ? weight[i + j] : 1.f;
        const float normed = xh[e] * w + (bias != nullptr ? bias[i + j] : 0.f);
        const float dn = g[j] * (1.f + sc[j]);  // d loss / d norm(x)
        dsc[j] = g[j] * normed;
        atomicAdd(grad_weight + i + j, dn * xh[e]);
        atomicAdd(grad_bias + i + j, dn);
        dxh[e] = dn * w;
        c1 += dxh[e];
        c2 += dxh[e] * xh[e];
      }
      store<T, VEC>(grad_scale + base + i, dsc);
    }
  }
  block_sum2(c1, c2);
  const float m1 = rms ? 0.f : c1 / dim, m2 = c2 / dim;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int64_t i = (threadIdx.x + int64_t(k) * blockDim.x) * VEC;
    if (i < dim) {
      float dx[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) dx[j] = rstd * (dxh[k * VEC + j] - m1 - xh[k * VEC + j] * m2);
      store<T, VEC>(grad_x + base + i, dx);
    }
  }
}

template <typename T, int VEC>
int threads_for(int64_t dim) {
  const int64_t vectors = (dim + VEC - 1) / VEC;
  return static_cast<int>(vectors >= kBlockThreads ? kBlockThreads : ((vectors + 31) / 32) * 32);
}

template <typename T>
void forward_typed(const void* x, const void* residual, const void* branch, const void* gate, const void* shift,
                   const void* scale, int64_t mod_stride, const float* weight, const float* bias, void* residual_out,
                   void* y, int64_t rows, int64_t dim, bool rms, float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool gated = residual != nullptr;
  const bool vectorised = dim % kVec == 0 && aligned16(x) && aligned16(residual) && aligned16(branch) &&
                          aligned16(gate) && aligned16(shift) && aligned16(scale) && aligned16(residual_out) &&
                          aligned16(y);
  auto c = [](const void* p) { return static_cast<const T*>(p); };
#define LCM_FAST_LAUNCH(VEC_, GATED_)                                                                        \
  adaln_forward_kernel<T, VEC_, GATED_><<<rows, threads_for<T, VEC_>(dim), 0, stream>>>(                   \
      c(x), c(residual), c(branch), c(gate), c(shift), c(scale), mod_stride, weight, bias,                    \
      static_cast<T*>(residual_out), static_cast<T*>(y), dim, rms, eps)
  if (vectorised) {
    if (gated) LCM_FAST_LAUNCH(kVec, true); else LCM_FAST_LAUNCH(kVec, false);
  } else {
    if (gated) LCM_FAST_LAUNCH(1, true); else LCM_FAST_LAUNCH(1, false);
  }
#undef LCM_FAST_LAUNCH
}

template <typename T>
void backward_typed(const void* grad_y, const void* x, const void* scale, const float* weight, const float* bias,
                    void* grad_x, void* grad_scale, float* grad_weight, float* grad_bias, int64_t rows, int64_t dim,
                    bool rms, float eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorised = dim % kVec == 0 && aligned16(grad_y) && aligned16(x) && aligned16(scale) &&
                          aligned16(grad_x) && aligned16(grad_scale);
  auto c = [](const void* p) { return static_cast<const T*>(p); };
  if (vectorised) {
    adaln_backward_kernel<T, kVec><<<rows, threads_for<T, kVec>(dim), 0, stream>>>(
        c(grad_y), c(x), c(scale), weight, bias, static_cast<T*>(grad_x), static_cast<T*>(grad_scale), grad_weight,
        grad_bias, dim, rms, eps);
  } else {
    adaln_backward_kernel<T, 1><<<rows, threads_for<T, 1>(dim), 0, stream>>>(
        c(grad_y), c(x), c(scale), weight, bias, static_cast<T*>(grad_x), static_cast<T*>(grad_scale), grad_weight,
        grad_bias, dim, rms, eps);
  }
}

}  // namespace

void launch_adaln_forward(const void* x, const void* residual, const void* branch, const void* gate, const void* shift,
                          const void* scale, int64_t mod_stride, const float* weight, const float* bias,
                          void* residual_out, void* y, int64_t rows, int64_t dim, bool rms, float eps, DType dtype,
                          void* stream) {
  if (rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      forward_typed<float>(x, residual, branch, gate, shift, scale, mod_stride, weight, bias, residual_out, y, rows, dim,
                           rms, eps, s);
      break;
    case DType::kBFloat16:
      forward_typed<__nv_bfloat16>(x, residual, branch, gate, shift, scale, mod_stride, weight, bias, residual_out, y,
                                   rows, dim, rms, eps, s);
      break;
    case DType::kFloat16:
      forward_typed<__half>(x, residual, branch, gate, shift, scale, mod_stride, weight, bias, residual_out, y, rows,
                            dim, rms, eps, s);
      break;
  }
}

void launch_adaln_backward(const void* grad_y, const void* x, const void* scale, const float* weight,
                           const float* bias, void* grad_x, void* grad_scale, float* grad_weight, float* grad_bias,
                           int64_t rows, int64_t dim, bool rms, float eps, DType dtype, void* stream) {
  if (rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32:
      backward_typed<float>(grad_y, x, scale, weight, bias, grad_x, grad_scale, grad_weight, grad_bias, rows, dim, rms,
                            eps, s);
      break;
    case DType::kBFloat16:
      backward_typed<__nv_bfloat16>(grad_y, x, scale, weight, bias, grad_x, grad_scale, grad_weight, grad_bias, rows,
                                    dim, rms, eps, s);
      break;
    case DType::kFloat16:
      backward_typed<__half>(grad_y, x, scale, weight, bias, grad_x, grad_scale, grad_weight, grad_bias, rows, dim,
                             rms, eps, s);
      break;
  }
}

}  // namespace lcm_fast
