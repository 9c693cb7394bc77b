// CUDA implementation of the RVQ ops (torch-free: raw pointers and a stream).
//
// rvq_encode: one block owns kRows rows for all M steps, so the residual never leaves the device and
// steps need no grid-wide sync. Per step it walks K in tiles of kCents centroids: a tiled fp32 GEMM
// (shared-memory tiles of kDepth dims, a 4 x 4 register tile per thread) whose epilogue folds the
// distances into each thread's running minimum; a block reduction picks each row's code and the
// block subtracts the chosen centroids. fp32 throughout, so codes are those of the CPU kernel up to
// rounding at exact ties. rvq_decode: one block per vector, the gather-sum in codebook order.
#include <cfloat>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "rvq/rvq.h"

namespace lcm_fast {
namespace {

constexpr int kRows = 64;     // rows per block
constexpr int kCents = 64;    // centroids per tile
constexpr int kDepth = 16;    // dims per shared-memory tile
constexpr int kSide = 16;     // threads per side: 16 x 16 = 256 threads, 4 x 4 outputs each
constexpr int kThreads = kSide * kSide;
constexpr int kPer = kRows / kSide;  // 4

__global__ void __launch_bounds__(kThreads) rvq_encode_kernel(float* __restrict__ residual,
                                                               const float* __restrict__ codebooks,
                                                               const float* __restrict__ sq_norms,
                                                               int32_t* __restrict__ codes, int64_t n, int64_t M,
                                                               int64_t K, int64_t d) {
  __shared__ float tile_r[kDepth][kRows + 4];   // residual tile, [dim][row] (+4: fewer bank conflicts)
  __shared__ float tile_c[kDepth][kCents + 4];  // centroid tile, [dim][centroid]
  __shared__ float part_dist[kRows][kSide];
  __shared__ int32_t part_idx[kRows][kSide];
  __shared__ int32_t chosen[kRows];
  const int tx = threadIdx.x % kSide, ty = threadIdx.x / kSide;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;

  for (int64_t m = 0; m < M; ++m) {
    const float* cb = codebooks + m * K * d;
    const float* sq = sq_norms + m * K;
    float best[kPer];
    int32_t best_idx[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      best[i] = FLT_MAX;
      best_idx[i] = 0;
    }
    for (int64_t c0 = 0; c0 < K; c0 += kCents) {
      float acc[kPer][kPer] = {};
      for (int64_t k0 = 0; k0 < d; k0 += kDepth) {
        for (int e = threadIdx.x; e < kRows * kDepth; e += kThreads) {
          const int i = e / kDepth, kk = e % kDepth;
          const int64_t row = row0 + i, c = c0 + i, dim = k0 + kk;
          tile_r[kk][i] = (row < n && dim < d) ? residual[row * d + dim] : 0.f;
          tile_c[kk][i] = (c < K && dim < d) ? cb[c * d + dim] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kDepth; ++kk) {
          float a[kPer], b[kPer];
#pragma unroll
          for (int i = 0; i < kPer; ++i) {
            a[i] = tile_r[kk][ty * kPer + i];
            b[i] = tile_c[kk][tx * kPer + i];
          }
#pragma unroll
          for (int i = 0; i < kPer; ++i)
#pragma unroll
            for (int j = 0; j < kPer; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
      }
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int64_t c = c0 + tx * kPer + j;
        if (c >= K) break;
        const float norm = sq[c];
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const float dist = norm - 2.f * acc[i][j];
          if (dist < best[i]) {  // centroids visited in increasing order: the lowest index wins ties
            best[i] = dist;
            best_idx[i] = int32_t(c);
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      part_dist[ty * kPer + i][tx] = best[i];
      part_idx[ty * kPer + i][tx] = best_idx[i];
    }
    __syncthreads();
    if (threadIdx.x < kRows) {
      const int i = threadIdx.x;
      float b = part_dist[i][0];
      int32_t idx = part_idx[i][0];
      for (int t = 1; t < kSide; ++t) {
        const float v = part_dist[i][t];
        const int32_t vi = part_idx[i][t];
        if (v < b || (v == b && vi < idx)) {
          b = v;
          idx = vi;
        }
      }
      chosen[i] = idx;
      if (row0 + i < n) codes[(row0 + i) * M + m] = idx;
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < int64_t(kRows) * d; e += kThreads) {
      const int64_t i = e / d, dim = e % d, row = row0 + i;
      if (row < n) residual[row * d + dim] -= cb[int64_t(chosen[i]) * d + dim];
    }
    __syncthreads();  // the next step's tiles read the updated residual
  }
}

template <typename Code>
__global__ void rvq_decode_kernel(const Code* __restrict__ codes, const float* __restrict__ codebooks,
                                  float* __restrict__ out, int64_t M, int64_t K, int64_t d, int64_t prefix) {
  const int64_t row = blockIdx.x;
  const Code* code = codes + row * M;
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    float acc = codebooks[int64_t(code[0]) * d + e];
    for (int64_t j = 1; j < prefix; ++j) acc += codebooks[(j * K + int64_t(code[j])) * d + e];
    out[row * d + e] = acc;
  }
}

}  // namespace

void launch_rvq_encode(float* residual, const float* codebooks, const float* sq_norms, int32_t* codes, int64_t n,
                       int64_t m, int64_t k, int64_t d, void* stream) {
  if (n == 0) return;
  const unsigned blocks = unsigned((n + kRows - 1) / kRows);
  rvq_encode_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(residual, codebooks, sq_norms, codes,
                                                                                 n, m, k, d);
}

void launch_rvq_decode(const void* codes, CodeType code_type, const float* codebooks, float* out, int64_t n, int64_t m,
                       int64_t k, int64_t d, int64_t prefix, void* stream) {
  if (n == 0) return;
  const int threads = int(d >= 256 ? 256 : ((d + 31) / 32) * 32);
  auto s = static_cast<cudaStream_t>(stream);
  switch (code_type) {
    case CodeType::kInt16:
      rvq_decode_kernel<<<unsigned(n), threads, 0, s>>>(static_cast<const int16_t*>(codes), codebooks, out, m, k, d, prefix);
      break;
    case CodeType::kInt32:
      rvq_decode_kernel<<<unsigned(n), threads, 0, s>>>(static_cast<const int32_t*>(codes), codebooks, out, m, k, d, prefix);
      break;
    case CodeType::kInt64:
      rvq_decode_kernel<<<unsigned(n), threads, 0, s>>>(static_cast<const int64_t*>(codes), codebooks, out, m, k, d, prefix);
      break;
  }
}

}  // namespace lcm_fast
