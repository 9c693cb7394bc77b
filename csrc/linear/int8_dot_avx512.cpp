// AVX-512 tiles of int8_dot.h. CMake compiles this file alone with -mavx512f -mavx512bw -mavx512vl; without them (a
// build for another architecture) it only says that it has none.
#include "linear/int8_dot.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#include <array>
#include <cstdlib>
#include <utility>

namespace lcm_fast {
namespace {

// 16 int8 at p (the first n when masked) as fp32: one shuffle and one convert per 16 weights.
inline __m512 widen(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

template <int R, int C>
void tile(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t K, float* dot) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = widen(w + c * ldw + k, mask);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dot[r * C + c] = _mm512_reduce_add_ps(acc[r][c]);
}

using Tile = void (*)(const float*, int64_t, const int8_t*, int64_t, int64_t, float*);

template <int R, int... cs>
constexpr std::array<Tile, 4> row(std::integer_sequence<int, cs...>) {
  return {&tile<R, cs + 1>...};
}

constexpr std::array<std::array<Tile, 4>, 3> kTiles = {row<1>(std::make_integer_sequence<int, 4>()),
                                                      row<2>(std::make_integer_sequence<int, 4>()),
                                                      row<3>(std::make_integer_sequence<int, 4>())};

}  // namespace

bool int8_dot_avx512_supported() {
  // LCM_FAST_NO_AVX512=1 keeps the AVX2 tiles (what a CPU without AVX-512 runs: the tests compare both)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && !std::getenv("LCM_FAST_NO_AVX512");
  return supported;
}

void int8_dot_tile_avx512(int rows, int cols, const float* x, int64_t ldx, const int8_t* w, int64_t ldw, int64_t K,
                          float* dot) {
  kTiles[rows - 1][cols - 1](x, ldx, w, ldw, K, dot);
}

}  // namespace lcm_fast

#else

namespace lcm_fast {

bool int8_dot_avx512_supported() { return false; }

void int8_dot_tile_avx512(int, int, const float*, int64_t, const int8_t*, int64_t, int64_t, float*) {}

}  // namespace lcm_fast

#endif
