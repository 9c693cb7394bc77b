// Host bindings of the CUDA RVQ ops (compiled by the C++ compiler; the kernels are in the .cu).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "rvq/rvq_checks.h"

namespace lcm_fast {
namespace {

at::Tensor rvq_encode_cuda(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& sq_norms,
                           const std::optional<at::Tensor>& search_codebooks) {
  check_rvq_encode_args(x, codebooks, sq_norms);
  TORCH_CHECK(!search_codebooks.has_value(), "rvq_encode: the bf16 candidate search has no CUDA kernel; pass "
              "search_codebooks=None (the fp32 search)");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), M = codebooks.size(0), K = codebooks.size(1), d = codebooks.size(2);
  at::Tensor codes = at::empty({N, M}, x.options().dtype(at::kInt));
  at::Tensor residual = x.contiguous().clone();
  launch_rvq_encode(residual.data_ptr<float>(), codebooks.const_data_ptr<float>(), sq_norms.const_data_ptr<float>(),
                    codes.data_ptr<int32_t>(), N, M, K, d, c10::cuda::getCurrentCUDAStream().stream());
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
