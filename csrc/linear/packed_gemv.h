// CUDA weight-only GEMV (packed_gemv_cuda.cu) for the skinny linear's packed weights (skinny_linear_checks.h):
// torch-free, shared by the .cu and the host bindings.
#pragma once

#include <cstdint>

#include "linear/packed_dot.h"   // PackedFormat
#include "sampler/guided_ddim.h"  // DType

namespace lcm_fast {

// Rows of x the GEMV takes (each warp keeps one accumulator per row); more are a GEMM (the host dequantizes).
constexpr int64_t kPackedGemvMaxRows = 8;

// out[m, n] (row stride ldo) = scale[n] * (x[m] . q[n]) + bias[n] for x [M, K] and out of type dtype, q [N, K] bytes
// of format fmt contiguous, scales the N fp32 row scales (any byte alignment), bias [N] of type dtype or null;
// M <= kPackedGemvMaxRows.
void launch_packed_gemv(const void* x, int64_t M, int64_t K, const void* q, PackedFormat fmt, const uint8_t* scales,
                        const void* bias, int64_t N, void* out, int64_t ldo, DType dtype, void* stream);

}  // namespace lcm_fast
