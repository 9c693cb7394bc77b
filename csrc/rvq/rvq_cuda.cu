// CUDA implementation of the RVQ ops (torch-free: raw pointers and a stream).
//
// rvq_encode: one block owns kRows rows for all M steps, so the residual never leaves the device and
// steps need no grid-wide sync. Per step it walks K in tiles of kCents centroids: a tiled fp32 GEMM
// (shared-memory tiles of kDepth dims, a 4 x 4 register tile per thread) whose epilogue folds the
// distances into each thread's running minimum; a block reduction picks each row's code and the
// block subtracts the chosen centroids. fp32 throughout, so codes are those of the CPU kernel up to
// rounding at exact ties. rvq_decode: one block per vector, the gather-sum in codebook order.
//
// The candidate search (rvq.h, certify.h) takes its approximate dots from cuBLAS (rvq_cuda.cpp: bf16 inputs on
// tensor cores, fp32 output); here one warp per row rounds the residual to bf16 (rvq_round_kernel) and, per
// stage, selects from the row's dots (rvq_select_kernel): per-lane shortlists merged across the warp, the fp32
// re-rank, the certificate and the recheck of an uncertified row, the residual update, and the rounding of
// the new residual for the next stage's GEMM. Warp sums reduce by xor butterfly, which leaves the same bits
// in every lane, so every lane takes the same decisions.
#include <cfloat>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "rvq/certify.h"
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

constexpr int kSelectWarps = 8;  // rows per block of the candidate search's kernels
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Rounds the row `row` [d] to bf16 into `out`; returns |row|^2 and |row - bf16(row)|^2 (warp sums).
__device__ __forceinline__ float2 round_row(const float* row, __nv_bfloat16* out, int64_t d, int lane) {
  float n2 = 0.f, e2 = 0.f;
  for (int64_t i = lane; i < d; i += 32) {
    const float v = row[i];
    const __nv_bfloat16 b = __float2bfloat16_rn(v);
    out[i] = b;
    const float e = v - __bfloat162float(b);
    n2 = fmaf(v, v, n2);
    e2 = fmaf(e, e, e2);
  }
  return make_float2(warp_sum(n2), warp_sum(e2));
}

__global__ void __launch_bounds__(kSelectWarps * 32) rvq_round_kernel(const float* __restrict__ residual,
                                                                        __nv_bfloat16* __restrict__ out,
                                                                        float* __restrict__ norm2,
                                                                        float* __restrict__ err2, int64_t n,
                                                                        int64_t d) {
  const int64_t row = int64_t(blockIdx.x) * kSelectWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  const float2 sums = round_row(residual + row * d, out + row * d, d, lane);
  if (lane == 0) {
    norm2[row] = sums.x;
    err2[row] = sums.y;
  }
}

// Drops a shortlist's first entry (the rest move up, an empty slot enters last).
__device__ __forceinline__ void pop_front(float (&score)[kRvqCandidates], int32_t (&idx)[kRvqCandidates]) {
#pragma unroll
  for (int i = 0; i + 1 < kRvqCandidates; ++i) {
    score[i] = score[i + 1];
    idx[i] = idx[i + 1];
  }
  score[kRvqCandidates - 1] = INFINITY;
  idx[kRvqCandidates - 1] = -1;
}

// (score, idx) before (other, other_idx): lexicographic, an empty slot (-1) last.
__device__ __forceinline__ bool before(float score, int32_t idx, float other, int32_t other_idx) {
  return score < other || (score == other && uint32_t(idx) < uint32_t(other_idx));
}

// One stage of the candidate search for rows [0, n) of a chunk: dots [n, K] (bf16(r).bf16(C) in fp32), the fp32
// residual [n, d] (updated: r -= C[code]), codebook cb [K, d] with squared norms sq [K] and *c_max (>= the
// largest centroid norm), the bf16 residual's |r|^2 and |r - bf16(r)|^2 per row (norm2, err2). The code goes to
// codes[row * code_stride]. With next_bf16, the new residual is rounded there (and norm2, err2 updated) for
// the next stage.
__global__ void __launch_bounds__(kSelectWarps * 32) rvq_select_kernel(
    const float* __restrict__ dots, float* __restrict__ residual, const float* __restrict__ cb,
    const float* __restrict__ sq, const float* __restrict__ c_max, float* __restrict__ norm2,
    float* __restrict__ err2, int32_t* __restrict__ codes, int64_t code_stride, __nv_bfloat16* __restrict__ next_bf16,
    int64_t n, int64_t K, int64_t d) {
  const int64_t row = int64_t(blockIdx.x) * kSelectWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= n) return;
  const float* row_dots = dots + row * K;
  float* r = residual + row * d;

  // each lane's shortlist over k = lane, lane + 32, ... (increasing: strict insertion keeps ties' lowest k)
  float score[kRvqCandidates];
  int32_t idx[kRvqCandidates];
#pragma unroll
  for (int i = 0; i < kRvqCandidates; ++i) {
    score[i] = INFINITY;
    idx[i] = -1;
  }
  float max_dot = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const float dot = row_dots[k];
    const float mag = fabsf(dot);
    max_dot = (mag > max_dot || dot != dot) ? mag : max_dot;  // a NaN sticks: the bound is then not finite
    const float s = fmaf(-2.f, dot, sq[k]);
    if (!(s < score[kRvqCandidates - 1])) continue;
    score[kRvqCandidates - 1] = s;
    idx[kRvqCandidates - 1] = int32_t(k);
#pragma unroll
    for (int i = kRvqCandidates - 1; i > 0; --i)
      if (score[i] < score[i - 1]) {
        const float ts = score[i];
        score[i] = score[i - 1];
        score[i - 1] = ts;
        const int32_t ti = idx[i];
        idx[i] = idx[i - 1];
        idx[i - 1] = ti;
      }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(kFullMask, max_dot, offset);
    max_dot = (other > max_dot || other != other) ? other : max_dot;
  }
  // the warp's shortlist: the lexicographic minimum of the lanes' heads, kRvqCandidates times
  float list_score[kRvqCandidates];
  int32_t list_idx[kRvqCandidates];
#pragma unroll
  for (int j = 0; j < kRvqCandidates; ++j) {
    float s = score[0];
    int32_t k = idx[0];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float os = __shfl_xor_sync(kFullMask, s, offset);
      const int32_t ok = __shfl_xor_sync(kFullMask, k, offset);
      if (before(os, ok, s, k)) {
        s = os;
        k = ok;
      }
    }
    list_score[j] = s;
    list_idx[j] = k;
    if (k >= 0 && idx[0] == k) pop_front(score, idx);  // the owner (indices are unique across lanes)
  }

  const float bound = shortlist_bound(max_dot, sqrtf(norm2[row]), sqrtf(err2[row]), *c_max, d,
                                      ScoreArithmetic::kTensorCoreFp32Out);
  const int count = rerank_count(list_score, list_idx, bound);
  float part[kRvqCandidates] = {};
  for (int64_t i = lane; i < d; i += 32) {
    const float v = r[i];
#pragma unroll
    for (int c = 0; c < kRvqCandidates; ++c)
      if (c < count) part[c] = fmaf(v, cb[int64_t(list_idx[c]) * d + i], part[c]);
  }
  float best = INFINITY;
  int32_t code = 0;
#pragma unroll
  for (int c = 0; c < kRvqCandidates; ++c)
    if (c < count) {
      const float dist = sq[list_idx[c]] - 2.f * warp_sum(part[c]);
      if (nearer(dist, list_idx[c], best, code)) {
        best = dist;
        code = list_idx[c];
      }
    }
  if (!certified(list_score, best, bound)) {
    // the centroids that recheck, 32 at a time, in increasing k (ties keep the lowest index)
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const int64_t k = k0 + lane;
      unsigned todo = __ballot_sync(kFullMask, k < K && recheck(fmaf(-2.f, row_dots[k], sq[k]), best, bound));
      while (todo) {
        const int64_t kk = k0 + __ffs(todo) - 1;
        todo &= todo - 1;
        float dot = 0.f;
        for (int64_t i = lane; i < d; i += 32) dot = fmaf(r[i], cb[kk * d + i], dot);
        const float dist = sq[kk] - 2.f * warp_sum(dot);
        if (nearer(dist, int32_t(kk), best, code)) {
          best = dist;
          code = int32_t(kk);
        }
      }
    }
  }

  const float* chosen = cb + int64_t(code) * d;
  float n2 = 0.f, e2 = 0.f;
  for (int64_t i = lane; i < d; i += 32) {
    const float v = r[i] - chosen[i];
    r[i] = v;
    if (next_bf16 != nullptr) {
      const __nv_bfloat16 b = __float2bfloat16_rn(v);
      next_bf16[row * d + i] = b;
      const float e = v - __bfloat162float(b);
      n2 = fmaf(v, v, n2);
      e2 = fmaf(e, e, e2);
    }
  }
  if (next_bf16 != nullptr) {
    n2 = warp_sum(n2);
    e2 = warp_sum(e2);
  }
  if (lane == 0) {
    codes[row * code_stride] = code;
    if (next_bf16 != nullptr) {
      norm2[row] = n2;
      err2[row] = e2;
    }
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

void launch_rvq_round(const float* residual, void* out_bf16, float* norm2, float* err2, int64_t n, int64_t d,
                      void* stream) {
  if (n == 0) return;
  const unsigned blocks = unsigned((n + kSelectWarps - 1) / kSelectWarps);
  rvq_round_kernel<<<blocks, kSelectWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      residual, static_cast<__nv_bfloat16*>(out_bf16), norm2, err2, n, d);
}

void launch_rvq_select(const float* dots, float* residual, const float* codebook, const float* sq_norms,
                       const float* c_max, float* norm2, float* err2, int32_t* codes, int64_t code_stride,
                       void* next_bf16, int64_t n, int64_t k, int64_t d, void* stream) {
  if (n == 0) return;
  const unsigned blocks = unsigned((n + kSelectWarps - 1) / kSelectWarps);
  rvq_select_kernel<<<blocks, kSelectWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      dots, residual, codebook, sq_norms, c_max, norm2, err2, codes, code_stride,
      static_cast<__nv_bfloat16*>(next_bf16), n, k, d);
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
