// AVX-512 tiles of packed_dot.h. CMake compiles this file alone with -mavx512f -mavx512bw -mavx512vl; without them (a
// build for another architecture) it only says that it has none.
#include "linear/packed_dot.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>

#include <array>
#include <cstdlib>
#include <type_traits>
#include <utility>

namespace lcm_fast {
namespace {

// 16 weights at p (the first of the mask in the tail) as fp32. int8: one shuffle and one convert. fp8 e4m3: as an
// fp16 (common/dot_tile.h says how) and converted, exact: the value times 2^-8, which the tile's sums undo.
template <PackedFormat F, bool kTail>
inline __m512 widen(const uint8_t* p, __mmask16 mask) {
  const __m128i q = kTail ? _mm_maskz_loadu_epi8(mask, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (F == PackedFormat::kInt8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  } else {
    const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(q), 7);
    return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(short(0xbfff))));
  }
}

constexpr int64_t kPrefetchBytes = 4096;

template <PackedFormat F, int R, int C>
void tile(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t K, float* dot) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  // masked loads only in the tail: in the main loop they ran the 2-row tiles at half speed on a Zen 5 EPYC
  const auto step = [&](int64_t k, auto tail, __mmask16 mask) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = widen<F, tail()>(w + c * ldw + k, mask);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = tail() ? _mm512_maskz_loadu_ps(mask, x + r * ldx + k) : _mm512_loadu_ps(x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    // once per cache line, each weight row's line kPrefetchBytes ahead (its band's next rows past the row's end): the
    // hardware prefetcher alone left these tiles at 35-40 GB/s on a Zen 5 EPYC, 50-70 with it (bench/RESULTS.md)
    if ((k & 63) == 0)
      for (int c = 0; c < C; ++c)
        _mm_prefetch(reinterpret_cast<const char*>(w + c * ldw + k + kPrefetchBytes), _MM_HINT_T0);
    step(k, std::false_type(), __mmask16(0xffff));
  }
  if (k < K) step(k, std::true_type(), __mmask16((1u << (K - k)) - 1));
  constexpr float kUnscale = F == PackedFormat::kInt8 ? 1.f : 256.f;  // exact: a power of two
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) dot[r * C + c] = _mm512_reduce_add_ps(acc[r][c]) * kUnscale;
}

using Tile = void (*)(const float*, int64_t, const uint8_t*, int64_t, int64_t, float*);
using Tiles = std::array<std::array<Tile, 4>, 3>;

template <PackedFormat F, int R, int... cs>
constexpr std::array<Tile, 4> row(std::integer_sequence<int, cs...>) {
  return {&tile<F, R, cs + 1>...};
}

template <PackedFormat F>
constexpr Tiles kTiles = {row<F, 1>(std::make_integer_sequence<int, 4>()),
                          row<F, 2>(std::make_integer_sequence<int, 4>()),
                          row<F, 3>(std::make_integer_sequence<int, 4>())};

}  // namespace

bool packed_dot_avx512_supported() {
  // LCM_FAST_NO_AVX512=1 keeps the AVX2 tiles (what a CPU without AVX-512 runs: the tests compare both)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && !std::getenv("LCM_FAST_NO_AVX512");
  return supported;
}

void packed_dot_tile_avx512(PackedFormat fmt, int rows, int cols, const float* x, int64_t ldx, const uint8_t* w,
                            int64_t ldw, int64_t K, float* dot) {
  const Tiles& tiles = fmt == PackedFormat::kInt8 ? kTiles<PackedFormat::kInt8> : kTiles<PackedFormat::kFp8E4M3>;
  tiles[rows - 1][cols - 1](x, ldx, w, ldw, K, dot);
}

}  // namespace lcm_fast

#else

namespace lcm_fast {

bool packed_dot_avx512_supported() { return false; }

void packed_dot_tile_avx512(PackedFormat, int, int, const float*, int64_t, const uint8_t*, int64_t, int64_t, float*) {}

}  // namespace lcm_fast

#endif
