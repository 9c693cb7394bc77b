// Residual vector quantization (paper section 2.3.5): greedy encoding against M codebooks of K
// centroids each, and coarse-to-fine decoding. Shared by the CPU and CUDA code; torch-free.
//
// Notation: x [N, d] the vectors, C [M, K, d] the codebooks, |C|^2 [M, K] their squared norms, r the
// running residual (r = x, then r -= C[m, code_m] after step m), codes [N, M].
//
// Step m picks argmin_k |r - C[m, k]|^2 = argmin_k (|C[m, k]|^2 - 2 r.C[m, k]): |r|^2 is the same for
// every k and is left out. Ties go to the lowest k (torch.argmin's rule).
//
// Candidate search (optional search codebooks: C in bf16, rounded to nearest): step m scores every
// centroid with the bf16 residual against the bf16 C[m] (fp32 accumulation; bf16 scores on the CPU, fp32
// from tensor cores on CUDA), keeps the kRvqCandidates best (ties: lowest k) and re-ranks them in fp32. A
// rigorous bound on the scores' error certifies that no centroid left out is nearer (certify.h); rows
// without the certificate (under 1 % of them at d = 1024 on the CPU; most when centroids are closer
// together than bf16 resolves, e.g. d = 1) are searched again in fp32. So the codes are those of the fp32
// search, up to fp32 rounding at near-ties.
#pragma once

#include <cstdint>

namespace lcm_fast {

constexpr int kRvqCandidates = 8;
// N K (scores per stage) from which rvq_encode takes the candidate search, when given search codebooks
constexpr int64_t kRvqSearchMinScores = 1 << 14;

enum class CodeType : int { kInt16 = 0, kInt32 = 1, kInt64 = 2 };

// CUDA launchers (rvq_cuda.cu), on `stream` (a cudaStream_t). All pointers are device pointers to
// contiguous fp32 / index arrays. `residual` [N, d] holds x on entry and the final residual on exit.
void launch_rvq_encode(float* residual, const float* codebooks, const float* sq_norms, int32_t* codes, int64_t n,
                       int64_t m, int64_t k, int64_t d, void* stream);
// The candidate search's kernels (certify.h); the approximate dots come from a GEMM in between. round: bf16(r)
// of residual rows [n, d] into out_bf16, with |r|^2 and |r - bf16(r)|^2 per row. select: one stage, from
// dots [n, K] (fp32, bf16(r).bf16(C)), codebook [K, d] fp32, its squared norms [K] and c_max (a device
// scalar >= its largest centroid norm): codes[row * code_stride] = the nearest centroid, r -= it, and
// with next_bf16 the new residual rounded there (norm2, err2 updated).
void launch_rvq_round(const float* residual, void* out_bf16, float* norm2, float* err2, int64_t n, int64_t d,
                      void* stream);
void launch_rvq_select(const float* dots, float* residual, const float* codebook, const float* sq_norms,
                       const float* c_max, float* norm2, float* err2, int32_t* codes, int64_t code_stride,
                       void* next_bf16, int64_t n, int64_t k, int64_t d, void* stream);
// out [N, d] = sum over j < prefix of C[j, codes[i, j]], accumulated in codebook order (faiss's order).
void launch_rvq_decode(const void* codes, CodeType code_type, const float* codebooks, float* out, int64_t n,
                       int64_t m, int64_t k, int64_t d, int64_t prefix, void* stream);

}  // namespace lcm_fast
