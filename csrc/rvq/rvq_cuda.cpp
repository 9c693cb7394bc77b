// Host bindings of the CUDA RVQ ops (compiled by the C++ compiler; the kernels are in the .cu).
//
// With search codebooks and from kRvqSearchMinScores scores, rvq_encode runs the candidate search (rvq.h): per
// chunk of rows and per stage, cuBLAS scores the bf16 residual against the bf16 codebook on tensor cores into
// fp32 (mm.dtype_out: an fp32 output keeps the bf16 output rounding and reduced-precision split-K sums out of
// the bound), and the select kernel shortlists, re-ranks, certifies and updates the residual.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sqrt.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "rvq/rvq_checks.h"

namespace lcm_fast {
namespace {

constexpr int64_t kChunkScores = 1 << 25;      // fp32 scores per chunk of rows (128 MB)

// rvq_encode through the candidate search: rows in chunks of the scores buffer, each chunk through all M stages.
void encode_candidates(at::Tensor& residual, const at::Tensor& codebooks, const at::Tensor& search_codebooks,
                       const at::Tensor& sq_norms, at::Tensor& codes, void* stream) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // codebooks that require grad must not make mm_out refuse
  const int64_t N = residual.size(0), M = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  const int64_t rows = std::min(N, std::max<int64_t>(1, kChunkScores / K));
  // >= the largest centroid norm of each codebook, on the device: no host sync
  const at::Tensor c_max = at::mul(at::sqrt(at::amax(sq_norms, {1})), 1 + 0x1p-20);
  at::Tensor res_bf16 = at::empty({rows, d}, search_codebooks.options());
  at::Tensor norms = at::empty({2, rows}, residual.options());  // |r|^2, |r - bf16(r)|^2
  at::Tensor dots = at::empty({rows, K}, residual.options());
  float* res = residual.data_ptr<float>();
  const float* cbs = codebooks.const_data_ptr<float>();
  const float* sqs = sq_norms.const_data_ptr<float>();
  const float* c_maxs = c_max.const_data_ptr<float>();
  float* norm2 = norms.data_ptr<float>();
  float* err2 = norm2 + rows;
  int32_t* out = codes.data_ptr<int32_t>();
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t n = std::min(rows, N - r0);
    at::Tensor chunk_bf16 = res_bf16.narrow(0, 0, n), chunk_dots = dots.narrow(0, 0, n);
    launch_rvq_round(res + r0 * d, chunk_bf16.data_ptr(), norm2, err2, n, d, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t m = 0; m < M; ++m) {
      at::mm_out(chunk_dots, chunk_bf16, search_codebooks[m].t(), at::kFloat);
      launch_rvq_select(chunk_dots.const_data_ptr<float>(), res + r0 * d, cbs + m * K * d, sqs + m * K, c_maxs + m,
                        norm2, err2, out + r0 * M + m, M, m + 1 < M ? chunk_bf16.data_ptr() : nullptr, n, K, d,
                        stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

at::Tensor rvq_encode_cuda(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& sq_norms,
                           const std::optional<at::Tensor>& search_codebooks) {
  check_rvq_encode_args(x, codebooks, sq_norms);
  if (search_codebooks) check_search_codebooks(*search_codebooks, codebooks);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), M = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  at::Tensor codes = at::empty({N, M}, x.options().dtype(at::kInt));
  at::Tensor residual = x.contiguous().clone();
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  if (search_codebooks && N * K >= kRvqSearchMinScores) {
    encode_candidates(residual, codebooks, *search_codebooks, sq_norms, codes, stream);
    return codes;
  }
  launch_rvq_encode(residual.data_ptr<float>(), codebooks.const_data_ptr<float>(), sq_norms.const_data_ptr<float>(),
                    codes.data_ptr<int32_t>(), N, M, K, d, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return codes;
}

at::Tensor rvq_decode_cuda(const at::Tensor& codes, const at::Tensor& codebooks, int64_t prefix) {
  const CodeType type = check_rvq_decode_args(codes, codebooks, prefix);
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t N = codes.size(0), K = codebooks.size(1), d = codebooks.size(2);
  at::Tensor out = at::empty({N, d}, codebooks.options());
  // codes are trusted here (the gather has no bounds check); ResidualQuantizer.decode validates them
  launch_rvq_decode(codes.const_data_ptr(), type, codebooks.const_data_ptr<float>(), out.data_ptr<float>(), N,
                    codes.size(1), K, d, prefix, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CUDA, m) {
  m.impl("rvq_encode", &rvq_encode_cuda);
  m.impl("rvq_decode", &rvq_decode_cuda);
}

}  // namespace lcm_fast
