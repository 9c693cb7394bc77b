// CUDA weight-only int8 GEMV (int8_gemv_cuda.cu) for the skinny linear's packed int8 weights
// (skinny_linear_checks.h): torch-free, shared by the .cu and the host bindings.
#pragma once

#include <cstdint>

#include "sampler/guided_ddim.h"  // DType

namespace lcm_fast {

// Rows of x the GEMV takes (each warp keeps one accumulator per row); more are a GEMM (the host dequantizes).
constexpr int64_t kInt8GemvMaxRows = 8;

// out[m, n] (row stride ldo) = scale[n] * (x[m] . q[n]) + bias[n] for x [M, K] and out of type dtype, q [N, K] int8
// contiguous, scales the N fp32 row scales (any byte alignment), bias [N] of type dtype or null; M <= kInt8GemvMaxRows.
void launch_int8_gemv(const void* x, int64_t M, int64_t K, const int8_t* q, const uint8_t* scales, const void* bias,
                      int64_t N, void* out, int64_t ldo, DType dtype, void* stream);

}  // namespace lcm_fast
