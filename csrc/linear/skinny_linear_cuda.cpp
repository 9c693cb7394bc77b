// CUDA skinny_linear: cuBLAS. On the GPU the vendor GEMV/GEMM paths already stream the weights at
// close to peak bandwidth for a few rows, so the op forwards to at::linear; it exists on CUDA so that
// one op (and one torch.compile / CUDA-graph trace) serves both devices. Packed (int8, fp8) weights take the
// weight-only GEMV (packed_gemv_cuda.cu) for up to kPackedGemvMaxRows rows, and more rows a GEMM on the dequantized
// weight.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>

#include <vector>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adaln/adaln_host.h"
#include "linear/packed_gemv.h"
#include "linear/skinny_linear_checks.h"

namespace lcm_fast {
namespace {

// x [M, K] W^T + b for a packed W (skinny_linear_checks.h): the weight-only GEMV for few rows; more rows are a GEMM,
// on the weight dequantized to x's dtype (a copy of it per call: prefills, not decoding steps)
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  const bool int8 = w.scalar_type() == at::kByte;
  if (M > kPackedGemvMaxRows) {
    const at::Tensor flat = w.reshape({-1});
    const at::Tensor q = flat.narrow(0, 0, N * K).view({N, K});
    const at::Tensor scales = flat.narrow(0, N * K, N * kPackedScaleBytes).view(at::kByte).clone().view(at::kFloat);
    const at::Tensor values = (int8 ? q.view(at::kChar) : q).to(x.scalar_type());
    return at::linear(xc, at::mul(values, scales.unsqueeze(1).to(x.scalar_type())), bias);
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  launch_packed_gemv(xc.const_data_ptr(), M, K, w.const_data_ptr(), int8 ? PackedFormat::kInt8 : PackedFormat::kFp8E4M3,
                     packed_scales(w), b.defined() ? b.const_data_ptr() : nullptr, N, out.data_ptr(), N,
                     adaln_dtype(xc), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return is_packed(weight) ? packed_linear(x, weight, bias) : at::linear(x, weight, bias);
}

at::Tensor skinny_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_skinny_linear_args(x, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_cuda(x, weight, bias);
}

// composed: one cuBLAS call per weight, then the cat or the SwiGLU product
at::Tensor skinny_linear_multi_cuda(const at::Tensor& x, at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& biases, bool glu) {
  check_skinny_linear_multi_args(x, weights, biases, glu);
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < weights.size(); ++i) ys.push_back(linear_cuda(x, weights[i], biases.get(i)));
  return glu ? at::mul(at::silu(ys[0]), ys[1]) : at::cat(ys, 1);
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CUDA, m) {
  m.impl("skinny_linear", &skinny_linear_cuda);
  m.impl("skinny_linear_multi", &skinny_linear_multi_cuda);
}

}  // namespace lcm_fast
