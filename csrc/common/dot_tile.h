// Register tiles of dot products on the CPU (AVX2 FMA through at::vec): R rows of an fp32 operand
// against C rows of a second operand of type W (fp32, or bf16/fp16/int8/fp8 widened to fp32 on load), all
// accumulated in fp32. Shared by the RVQ distance search and the skinny linear. Torch headers: never
// include from a .cu file.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Float8_e4m3fn.h>

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace lcm_fast {

using Vec = at::vec::Vectorized<float>;

inline float hsum(Vec v) { return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, v); }

// Vec::size() elements at p as fp32.
inline Vec load_f32(const float* p) { return Vec::loadu(p); }
template <typename W>
inline Vec load_f32(const W* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}

// int8 (weight-only quantized weights): sign-extended and converted, 8 at a time with AVX2.
inline Vec load_f32(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  float buf[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) buf[i] = float(p[i]);
  return Vec::loadu(buf);
#endif
}

// fp8 e4m3 (weight-only fp8) as an fp16 and widened by F16C (exact, subnormals included, whatever the FTZ/DAZ flags):
// the byte sign-extended to 16 bits and shifted by 7 puts e4m3's exponent and mantissa in an fp16's, its sign in
// bits 15 and 14; clearing bit 14 (fp16's top exponent bit) leaves the value times 2^-8 (fp16's exponent bias is 15,
// e4m3's 7), which kUnscale undoes on the tile's sums. NaN (never in a quantized weight) is not kept.
inline Vec load_f32(const c10::Float8_e4m3fn* p) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m128i s = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return Vec(_mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16(s, 7), _mm_set1_epi16(short(0xbfff)))));
#else
  float buf[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) buf[i] = float(p[i]) * (1.f / 256);
  return Vec::loadu(buf);
#endif
}

// What a tile's sums are multiplied by: the scale that load_f32 leaves on W's values.
template <typename W>
constexpr float kUnscale = std::is_same_v<W, c10::Float8_e4m3fn> ? 256.f : 1.f;

// The first n < Vec::size() elements at p as fp32 (as load_f32 widens them), zero-filled (0 * 0 adds nothing to a
// dot product).
template <typename W>
inline Vec load_f32(const W* p, int64_t n) {
  W buf[Vec::size()] = {};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return load_f32(static_cast<const W*>(buf));
}

// dot[r * C + c] = x_r . w[c] over d elements, for R rows of x (stride ldx) and C rows of w given by
// pointers (rows anywhere: the RVQ shortlist's centroids).
template <int R, int C, typename W>
void dot_tile_rows(const float* x, int64_t ldx, const W* const* w, int64_t d, float* dot) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= d; i += Vec::size()) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_f32(w[c] + i);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * ldx + i);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  if (i < d) {
    const int64_t n = d - i;
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_f32(w[c] + i, n);
    for (int r = 0; r < R; ++r) {
      const Vec xv = Vec::loadu(x + r * ldx + i, n);
      for (int c = 0; c < C; ++c) acc[r][c] = at::vec::fmadd(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dot[r * C + c] = hsum(acc[r][c]) * kUnscale<W>;
}

// The same for C rows of w with stride ldw.
template <int R, int C, typename W>
void dot_tile(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t d, float* dot) {
  const W* rows[C];
  for (int c = 0; c < C; ++c) rows[c] = w + c * ldw;
  dot_tile_rows<R, C, W>(x, ldx, rows, d, dot);
}

template <typename W>
using DotTile = void (*)(const float*, int64_t, const W*, int64_t, int64_t, float*);

// kTable[r - 1][c - 1] = dot_tile<r, c, W>, for tails smaller than the full tile.
template <int R, int C, typename W>
struct DotTiles {
  template <int r, int... cs>
  static constexpr std::array<DotTile<W>, C> row(std::integer_sequence<int, cs...>) {
    return {&dot_tile<r, cs + 1, W>...};
  }
  template <int... rs>
  static constexpr std::array<std::array<DotTile<W>, C>, R> table(std::integer_sequence<int, rs...>) {
    return {row<rs + 1>(std::make_integer_sequence<int, C>())...};
  }
  static constexpr std::array<std::array<DotTile<W>, C>, R> kTable = table(std::make_integer_sequence<int, R>());
};

}  // namespace lcm_fast
