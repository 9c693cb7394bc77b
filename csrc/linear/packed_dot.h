// Weight-only dot-product tiles with AVX-512 (packed_dot_avx512.cpp) for packed int8 / fp8 weights, chosen at run time
// by the skinny linear: the extension is built for x86-64-v3 (AVX2), and widening one-byte weights there is bound by
// the one shuffle port (vpmovsxbd: 8 weights per uop; 16 with AVX-512). Torch-free: that file is compiled with
// AVX-512 flags, and an inline function shared with other files could run AVX-512 code on a CPU without it.
#pragma once

#include <cstdint>

namespace lcm_fast {

// The values of a packed weight: int8, or fp8 e4m3 (one byte each either way).
enum class PackedFormat : int { kInt8 = 0, kFp8E4M3 = 1 };

// Whether this build has the AVX-512 tiles and the CPU runs them (AVX512F, BW, VL), unless LCM_FAST_NO_AVX512 is set.
bool packed_dot_avx512_supported();

// dot[r * cols + c] = x_r . w_c over K for rows <= 3 rows of fp32 x (stride ldx) and cols <= 4 rows of one-byte
// weights w of format fmt (stride ldw), accumulated in fp32. Only when packed_dot_avx512_supported().
void packed_dot_tile_avx512(PackedFormat fmt, int rows, int cols, const float* x, int64_t ldx, const uint8_t* w,
                            int64_t ldw, int64_t K, float* dot);

}  // namespace lcm_fast
