// CPU skinny linear: y = x W^T + b for a few rows of x (decoding: one or two rows per document).
//
// There a GEMM is bound by reading W once, yet the BLAS paths torch takes for [2, K] x [K, N] reach
// only ~4 GB/s on a 2-core AVX2 VM against ~22 GB/s for a plain sum over the same weights (measured,
// bench/RESULTS.md). Here each task streams its share of W as four sequential bands, one row of each
// per tile: a tile stays in L1 while every 3-row block of x (kept in L2) is dotted against it in
// registers (common/dot_tile.h), so W is read from memory exactly once. bf16/fp16 weights are
// widened on load and accumulated in fp32; so are int8 and fp8 weights (weight-only quantization: a quarter of
// fp32's bytes), each output then scaled by its row's scale.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/dot_tile.h"
#include "linear/packed_dot.h"

namespace lcm_fast {

// Whether the CPU multiplies bf16 (or fp16) natively, which BLAS then uses: AVX512-BF16 / AMX-BF16 (AVX512-FP16 /
// AMX-FP16), read from CPUID leaf 7 (torch's own query has changed its API across releases). Elsewhere than x86,
// many rows of half types are left to BLAS (ARM's BF16 extensions).
inline bool cpu_native_half_gemm(bool bf16) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned edx0 = edx, subleaves = eax;
  unsigned eax1 = 0;
  if (subleaves >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) eax1 = eax;
  return bf16 ? ((eax1 >> 5) & 1) || ((edx0 >> 22) & 1) : ((edx0 >> 23) & 1) || ((eax1 >> 21) & 1);
#else
  return true;
#endif
}

// More fp32 rows of x are a real GEMM (ops/linear.py MAX_ROWS): BLAS catches up from 64-128 rows.
constexpr int64_t kSkinnyMaxRows = 64;

// bf16/fp16 rows of x past this many are a real GEMM where the CPU multiplies them natively: on a Zen 5 EPYC with
// AVX512-BF16, BLAS ran 8 bf16 rows 1.1-1.4x faster than the kernel and 50 rows 3-3.5x, the kernel 1-4 rows
// 1.1-2.5x faster (bench/RESULTS.md).
constexpr int64_t kSkinnyNativeHalfMaxRows = 4;

// Whether M rows of x go through skinny_linear_kernel rather than BLAS, for weights of this dtype: fp32 up to
// kSkinnyMaxRows; bf16/fp16 at any M unless the CPU multiplies them natively (AMX, AVX512-BF16/FP16; then up to
// kSkinnyNativeHalfMaxRows): without, BLAS ran them at ~20 GFLOP/s against the kernel's 105-121 on the 2-core Zen3
// VM (bench/RESULTS.md); packed weights (uint8: int8; float8_e4m3fn: fp8) always: BLAS has no weight-only product.
inline bool skinny_takes(at::ScalarType dtype, int64_t M) {
  if (dtype == at::kByte || dtype == at::kFloat8_e4m3fn) return true;
  if (dtype == at::kFloat) return M <= kSkinnyMaxRows;
  static const bool native_bf16 = cpu_native_half_gemm(true), native_fp16 = cpu_native_half_gemm(false);
  return M <= kSkinnyNativeHalfMaxRows || !(dtype == at::kBFloat16 ? native_bf16 : native_fp16);
}

// rows of x per register tile: 3 x 4 tiles (12 accumulators, 4 weight vectors: the 16 AVX2 registers) ran
// 15-17 % faster than 2 x 4 at 16-32 rows (bench/RESULTS.md); 2 rows (batch 1 with CFG) take the 2 x 4 tail
constexpr int kSkinnyTileRows = 3;
constexpr int kSkinnyTileCols = 4;              // rows of W (output features) per register tile
constexpr int64_t kSkinnyWidenRows = 24;         // bf16/fp16 weights: from this many rows of x, widen tiles first
constexpr int64_t kSkinnyTaskBytes = 64 << 10;  // weights per parallel task at least (smaller layers are not split)

// Scale of weight row n: scales holds N fp32 values at any byte alignment (packed weights), or is null (1).
inline float row_scale(const uint8_t* scales, int64_t n) {
  if (scales == nullptr) return 1.f;
  float scale;
  std::memcpy(&scale, scales + n * sizeof(float), sizeof(float));
  return scale;
}

// y = x W^T + b: x [M, K] of type T contiguous, W [N, K] of type W (T, or the int8/fp8 values of a packed weight)
// contiguous, scales: null, or W's N fp32 row scales (packed), bias [N] of type T or null, out [M, N] of type T with
// row stride ldo (>= N: the columns of a wider output). Accumulated in fp32, each output scaled by its row's scale
// before the bias.
template <typename T, typename W>
void skinny_linear_kernel(const T* x_in, int64_t M, int64_t K, const W* w, const uint8_t* scales, const T* bias,
                          int64_t N, T* out, int64_t ldo) {
  // Many rows (bf16/fp16/int8/fp8 take any number): blocks of x that stay in L2 (512 KB in fp32; at least the fp32
  // limit, which never splits) while the tiles stream past, one pass over W each; x streamed from memory once per
  // tile ran a 3200-row bf16 prefill at ~50 GFLOP/s
  const int64_t block_rows = std::clamp<int64_t>((512 << 10) / (4 * K), kSkinnyMaxRows, 256);
  if (M > block_rows) {
    for (int64_t m = 0; m < M; m += block_rows)
      skinny_linear_kernel(x_in + m * K, std::min(block_rows, M - m), K, w, scales, bias, N, out + m * ldo, ldo);
    return;
  }
  constexpr auto& kTiles = DotTiles<kSkinnyTileRows, kSkinnyTileCols, W>::kTable;
  constexpr auto& kWide = DotTiles<kSkinnyTileRows, kSkinnyTileCols, float>::kTable;
  // narrow weights are widened in registers, with 2-row blocks (3-row ones spill); from kSkinnyWidenRows rows
  // on, each tile is widened once into an fp32 copy that 3-row blocks share (bench/RESULTS.md)
  const bool widen_tile = !std::is_same_v<W, float> && M >= kSkinnyWidenRows;
  // one-byte weights widen twice as fast with AVX-512 (packed_dot.h), whose 32 registers hold 3-row blocks
  constexpr bool int8 = std::is_same_v<W, int8_t>, fp8 = std::is_same_v<W, c10::Float8_e4m3fn>;
  const bool avx512 = (int8 || fp8) && !widen_tile && packed_dot_avx512_supported();
  const int block = std::is_same_v<W, float> || widen_tile || avx512 ? kSkinnyTileRows : 2;
  const float* x = reinterpret_cast<const float*>(x_in);
  std::vector<float> widened;  // bf16/fp16 x in fp32 (M * K: a few KB)
  if constexpr (!std::is_same_v<T, float>) {
    widened.assign(x_in, x_in + M * K);
    x = widened.data();
  }
  const int64_t tiles = (N + kSkinnyTileCols - 1) / kSkinnyTileCols;
  const int64_t grain = std::max<int64_t>(1, kSkinnyTaskBytes / (kSkinnyTileCols * K * int64_t(sizeof(W))));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    // The task's rows [r0, r1) of W are cut into kSkinnyTileCols bands read side by side: a tile takes
    // the j-th row of every band, so each band is one long sequential stream. Tiles of adjacent rows
    // instead start four short streams per tile (one 4 KB page at K = 256), which the hardware
    // prefetcher, stopping at page boundaries, never gets ahead of: 1.5-2x slower at K = 256-512 on
    // the 2-core Zen3 VM (bench/RESULTS.md).
    const int64_t r0 = begin * kSkinnyTileCols, r1 = std::min(end * kSkinnyTileCols, N);
    const int64_t span = (r1 - r0 + kSkinnyTileCols - 1) / kSkinnyTileCols;
    float dot[kSkinnyTileRows * kSkinnyTileCols];
    std::vector<float> tile(widen_tile ? kSkinnyTileCols * K : 0);
    for (int64_t j = 0; j < span; ++j) {
      const int64_t n = r0 + j;
      const int cols = int(std::min<int64_t>(kSkinnyTileCols, (r1 - n + span - 1) / span));
      float scale[kSkinnyTileCols];
      for (int c = 0; c < cols; ++c) scale[c] = row_scale(scales, n + c * span);
      if (widen_tile)
        for (int c = 0; c < cols; ++c) at::vec::convert(w + (n + c * span) * K, tile.data() + c * K, K);
      for (int64_t m = 0; m < M; m += block) {
        const int rows = int(std::min<int64_t>(block, M - m));
        if (widen_tile) kWide[rows - 1][cols - 1](x + m * K, K, tile.data(), K, K, dot);
        else if (avx512) packed_dot_tile_avx512(int8 ? PackedFormat::kInt8 : PackedFormat::kFp8E4M3, rows, cols,
                                                x + m * K, K, reinterpret_cast<const uint8_t*>(w + n * K), span * K, K,
                                                dot);
        else kTiles[rows - 1][cols - 1](x + m * K, K, w + n * K, span * K, K, dot);
        for (int r = 0; r < rows; ++r)
          for (int c = 0; c < cols; ++c) {
            const int64_t col = n + c * span;
            out[(m + r) * ldo + col] = T(dot[r * cols + c] * scale[c] + (bias ? float(bias[col]) : 0.f));
          }
      }
    }
  });
}

}  // namespace lcm_fast
