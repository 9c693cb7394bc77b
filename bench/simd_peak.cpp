// Single-core arithmetic peaks of the AVX2 instruction sequences an RVQ distance kernel can use:
// fp32 FMA (8 MACs per instruction) vs int8 vpmaddubsw + vpmaddwd (32 MACs per pair). Ten independent
// accumulator chains hide the latencies, so each loop runs at its instructions' throughput.
//   g++ -O3 -mavx2 -mfma bench/simd_peak.cpp -o /tmp/simd_peak && /tmp/simd_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9)

int main(int argc, char**) {
  const long iters = 100000000;
  using clock = std::chrono::steady_clock;

  __m256 x = _mm256_set1_ps(0.5f), y = _mm256_set1_ps(0.25f * argc);  // argc: not constant-folded
#define F_INIT(i) __m256 f##i = _mm256_set1_ps(float(i * argc));
#define F_STEP(i) f##i = _mm256_fmadd_ps(f##i, x, y);
#define F_SUM(i) fsum += f##i[0];
  CHAINS(F_INIT)
  auto t0 = clock::now();
  for (long n = 0; n < iters; ++n) {
    CHAINS(F_STEP)
    __asm__ volatile("" ::: "memory");
  }
  double fma_s = std::chrono::duration<double>(clock::now() - t0).count();
  float fsum = 0;
  CHAINS(F_SUM)

  __m256i a = _mm256_set1_epi8(char(3 * argc)), b = _mm256_set1_epi8(5), ones = _mm256_set1_epi16(1);
#define I_INIT(i) __m256i acc##i = _mm256_set1_epi32(i); __m256i a##i = _mm256_add_epi8(a, _mm256_set1_epi8(i));
#define I_STEP(i) acc##i = _mm256_add_epi32(acc##i, _mm256_madd_epi16(_mm256_maddubs_epi16(a##i, b), ones));
#define I_SUM(i) isum += _mm256_extract_epi32(acc##i, 0);
  CHAINS(I_INIT)
  t0 = clock::now();
  for (long n = 0; n < iters; ++n) {
    CHAINS(I_STEP)
    __asm__ volatile("" : "+x"(b));
  }
  double int8_s = std::chrono::duration<double>(clock::now() - t0).count();
  long isum = 0;
  CHAINS(I_SUM)

  // 2 operations per multiply-accumulate
  std::printf("fp32 FMA: %.1f GFLOP/s per core; int8 maddubs+maddwd: %.1f GOP/s per core (checksums %g %ld)\n",
              iters * 10 * 8 * 2 / fma_s / 1e9, iters * 10 * 32 * 2 / int8_s / 1e9, fsum, isum);
}
