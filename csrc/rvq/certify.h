// The certificate of the RVQ candidate search (rvq.h), shared by the CPU and CUDA kernels: torch-free,
// compiled for the host and, under nvcc, for the device.
//
// A row's shortlist holds the kRvqCandidates smallest approximate scores s^_k = |C_k|^2 - 2 bf16(r).bf16(C_k),
// ascending (ties: lowest k), and shortlist_bound gives B >= |s^_k - s_k| for every k, s_k the score with the
// exact dot. Then (1) a candidate with s^_i > s^_0 + 2 B is farther than candidate 0, so only the first
// rerank_count candidates are re-ranked in fp32; (2) when the shortlist's last score exceeds the re-ranked
// best by B, every centroid left out is farther than the best (certified); otherwise only centroids with
// s^_k <= best + B can be nearer, and those are searched again in fp32.
#pragma once

#include <cmath>
#include <cstdint>

#include "rvq/rvq.h"

#ifdef __CUDACC__
#define LCM_FAST_HD __host__ __device__ __forceinline__
#else
#define LCM_FAST_HD inline
#endif

namespace lcm_fast {

// How a backend computes the approximate dots bf16(r).bf16(C), which sets the bound's rounding terms.
enum class ScoreArithmetic : int {
  // CPU (oneDNN): fp32 accumulation rounded to nearest (unit 2^-24), the dot rounded to bf16 (unit 2^-8).
  kBf16Out = 0,
  // CUDA (cuBLAS on tensor cores, fp32 output): no output rounding beyond the accumulation's, but tensor
  // cores align a block's terms to the largest exponent and truncate (Fasi et al., "Numerical behavior of
  // NVIDIA tensor cores", 2021): each term loses at most 2 ulps of the block's largest magnitude, which a
  // unit of 2^-21 per accumulated term covers for any block size (and split-K's fp32 sums, 2^-24).
  kTensorCoreFp32Out = 1,
};

// A bound on |s^_k - s_k| for every centroid of a row: the rounding of r and C to bf16 (u relative each, by
// Cauchy-Schwarz against the largest centroid norm c_max), of the accumulation over d, of the dot's output
// (max_dot: the largest |approximate dot| of the row) and of the fp32 score arithmetic fl(|C|^2 - 2 dot),
// both of s^ and of the re-ranked score. Rigorous, and slack by ~sqrt(d) in practice (the roundings do not
// align). Not finite when an input is not (a NaN row, overflow): the row is then searched in full.
LCM_FAST_HD float shortlist_bound(float max_dot, float r_norm, float r_err_norm, float c_max, int64_t d,
                                  ScoreArithmetic arithmetic) {
  const double u = 1.0 / 256;  // bf16 unit roundoff (round to nearest)
  const bool bf16_out = arithmetic == ScoreArithmetic::kBf16Out;
  const double out = bf16_out ? u : 0.0;
  const double accum = bf16_out ? 0x1p-24 : 0x1p-21;
  const double nu = double(d) * accum;
  if (!(nu < 0.5)) return INFINITY;
  const double gamma = nu / (1 - nu);
  const double r_hat = r_norm * (1 + u);  // >= |bf16(r)|
  const double c = c_max;
  const double dot_err = out / (1 - out) * max_dot + (r_err_norm + u * r_hat) * c + gamma * r_hat * c * (1 + u);
  const double score_err = 0x1p-23 * (c * c + 2.0 * max_dot);
  return float((2 * dot_err + score_err) * (1 + 0x1p-10));  // the slack covers this formula's own rounding
}

// Whether (dist, k) is nearer than (best, best_k): the fp32 search's rule (ties: lowest index; NaN never).
LCM_FAST_HD bool nearer(float dist, int32_t k, float best, int32_t best_k) {
  return dist < best || (dist == best && k < best_k);
}

// How many of a shortlist's candidates (ascending scores, index -1 for an empty slot) can be the nearest: those
// scoring within 2 bounds of the first (mostly one).
LCM_FAST_HD int rerank_count(const float (&score)[kRvqCandidates], const int32_t (&idx)[kRvqCandidates],
                             float bound) {
  const float limit = score[0] + 2 * bound;
  int count = 0;
#pragma unroll
  for (int i = 0; i < kRvqCandidates; ++i) count += idx[i] >= 0 && score[i] <= limit;  // ascending: a prefix
  return count;
}

// Whether every centroid left out of the shortlist is farther than the re-ranked best.
LCM_FAST_HD bool certified(const float (&score)[kRvqCandidates], float best, float bound) {
  return score[kRvqCandidates - 1] > best + bound;
}

// Whether a centroid with approximate score s^ must be searched again for an uncertified row: it may be nearer
// than the best when s^ <= best + B; every centroid when that limit is not finite.
LCM_FAST_HD bool recheck(float score, float best, float bound) {
  const float limit = best + bound;
  return !(limit < INFINITY) || score <= limit;
}

}  // namespace lcm_fast
