// Weight-only int8 dot-product tiles with AVX-512 (int8_dot_avx512.cpp), chosen at run time by the skinny linear:
// the extension is built for x86-64-v3 (AVX2), and widening int8 weights there is bound by the one shuffle port
// (vpmovsxbd: 8 weights per uop; 16 with AVX-512). Torch-free: that file is compiled with AVX-512 flags, and an
// inline function shared with other files could run AVX-512 code on a CPU without it.
#pragma once

#include <cstdint>

namespace lcm_fast {

// Whether this build has the AVX-512 tiles and the CPU runs them (AVX512F, BW, VL), unless LCM_FAST_NO_AVX512 is set.
bool int8_dot_avx512_supported();

// dot[r * cols + c] = x_r . w_c over K for rows <= 3 rows of fp32 x (stride ldx) and cols <= 4 rows of int8 w
// (stride ldw), accumulated in fp32. Only when int8_dot_avx512_supported().
void int8_dot_tile_avx512(int rows, int cols, const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t K,
                          float* dot);

}  // namespace lcm_fast
