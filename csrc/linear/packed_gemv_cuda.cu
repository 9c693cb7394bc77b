// CUDA weight-only GEMV (int8 or fp8 e4m3 weights): one warp per weight row, reading it once in 16-byte loads
// (coalesced: a warp reads 512 contiguous bytes per step), widened to fp32 and dotted with every row of x (read
// through the cache: all warps share it); a warp sum per x row, then the row's scale and the bias. Rows not 16-byte
// aligned (K % 16 != 0) take a byte-wise loop. Decoding is bound by reading the weights, a quarter of fp32's bytes
// here.
#include <cuda_fp8.h>

#include <cstdint>
#include <utility>

#include "common/cuda_utils.cuh"
#include "linear/packed_gemv.h"

namespace lcm_fast {
namespace {

constexpr int kWarps = 8;  // weight rows per block

// One weight byte as fp32: int8 sign-extended, or e4m3 through the hardware conversion (sm_89+; emulated before).
template <PackedFormat F>
__device__ __forceinline__ float widen(uint32_t byte) {
  if constexpr (F == PackedFormat::kInt8) return float(int8_t(byte));
  else return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(byte), __NV_E4M3)));
}

template <typename T, PackedFormat F, int M>
__global__ void __launch_bounds__(kWarps * 32) packed_gemv_kernel(const T* __restrict__ x, int64_t K,
                                                                  const uint8_t* __restrict__ q,
                                                                  const uint8_t* __restrict__ scales,
                                                                  const T* __restrict__ bias, int64_t N,
                                                                  T* __restrict__ out, int64_t ldo, bool vectorised) {
  const int64_t n = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const uint8_t* row = q + n * K;
  float acc[M] = {};
  if (vectorised) {
    for (int64_t k = int64_t(lane) * 16; k < K; k += 32 * 16) {
      const int4 packed = *reinterpret_cast<const int4*>(row + k);
      const uint32_t words[4] = {uint32_t(packed.x), uint32_t(packed.y), uint32_t(packed.z), uint32_t(packed.w)};
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const float w = widen<F>((words[j >> 2] >> (8 * (j & 3))) & 0xffu);  // byte j
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] = fmaf(to_float(x[m * K + k + j]), w, acc[m]);
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      const float w = widen<F>(row[k]);
#pragma unroll
      for (int m = 0; m < M; ++m) acc[m] = fmaf(to_float(x[m * K + k]), w, acc[m]);
    }
  }
  const uint8_t* s = scales + n * sizeof(float);  // any alignment: assembled from bytes (little endian)
  const float scale = __uint_as_float(uint32_t(s[0]) | uint32_t(s[1]) << 8 | uint32_t(s[2]) << 16 | uint32_t(s[3]) << 24);
  const float b = bias != nullptr ? to_float(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float v = acc[m];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) out[m * ldo + n] = from_float<T>(v * scale + b);
  }
}

template <typename T, PackedFormat F, int... Ms>
void launch_typed(const void* x, int64_t M, int64_t K, const uint8_t* q, const uint8_t* scales, const void* bias,
                  int64_t N, void* out, int64_t ldo, cudaStream_t stream, std::integer_sequence<int, Ms...>) {
  const bool vectorised = K % 16 == 0 && reinterpret_cast<uintptr_t>(q) % 16 == 0;
  const unsigned blocks = unsigned((N + kWarps - 1) / kWarps);
  // one instantiation per row count (registers for exactly M accumulators)
  ((M == Ms + 1 ? packed_gemv_kernel<T, F, Ms + 1><<<blocks, kWarps * 32, 0, stream>>>(
                      static_cast<const T*>(x), K, q, scales, static_cast<const T*>(bias), N, static_cast<T*>(out),
                      ldo, vectorised)
                : void()),
   ...);
}

template <PackedFormat F>
void launch_format(const void* x, int64_t M, int64_t K, const uint8_t* q, const uint8_t* scales, const void* bias,
                   int64_t N, void* out, int64_t ldo, DType dtype, cudaStream_t s) {
  const auto rows = std::make_integer_sequence<int, kPackedGemvMaxRows>();
  switch (dtype) {
    case DType::kFloat32: launch_typed<float, F>(x, M, K, q, scales, bias, N, out, ldo, s, rows); break;
    case DType::kBFloat16: launch_typed<__nv_bfloat16, F>(x, M, K, q, scales, bias, N, out, ldo, s, rows); break;
    case DType::kFloat16: launch_typed<__half, F>(x, M, K, q, scales, bias, N, out, ldo, s, rows); break;
  }
}

}  // namespace

void launch_packed_gemv(const void* x, int64_t M, int64_t K, const void* q, PackedFormat fmt, const uint8_t* scales,
                        const void* bias, int64_t N, void* out, int64_t ldo, DType dtype, void* stream) {
  if (M == 0 || N == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const auto* bytes = static_cast<const uint8_t*>(q);
  if (fmt == PackedFormat::kInt8)
    launch_format<PackedFormat::kInt8>(x, M, K, bytes, scales, bias, N, out, ldo, dtype, s);
  else
    launch_format<PackedFormat::kFp8E4M3>(x, M, K, bytes, scales, bias, N, out, ldo, dtype, s);
}

}  // namespace lcm_fast
