// CPU skinny linear op: checks, layouts and dtype dispatch around skinny_linear_cpu.h.
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <torch/library.h>

#include "linear/skinny_linear_checks.h"
#include "linear/skinny_linear_cpu.h"

namespace lcm_fast {
namespace {

// out[:, col : col + N] = x W^T + b for contiguous x [M, K] of type T; out [M, >= col + N] contiguous
template <typename T>
void run_skinny_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& out, int64_t col) {
  const T* bias = b.defined() ? b.const_data_ptr<T>() : nullptr;
  if (is_packed(w))
    visit_packed(w, [&](auto q) {
      skinny_linear_kernel(x.const_data_ptr<T>(), x.size(0), x.size(1), q, packed_scales(w), bias, w.size(0),
                           out.data_ptr<T>() + col, out.size(1));
    });
  else
    skinny_linear_kernel(x.const_data_ptr<T>(), x.size(0), x.size(1), w.const_data_ptr<T>(), nullptr, bias,
                         w.size(0), out.data_ptr<T>() + col, out.size(1));
}

void linear_into(const at::Tensor& xc, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& out,
                 int64_t col) {
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (!skinny_takes(w.scalar_type(), xc.size(0))) {  // a real GEMM (skinny_linear_cpu.h)
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // inference only, as the kernel
    out.narrow(1, col, w.size(0)).copy_(b.defined() ? at::addmm(b, xc, w.t()) : at::mm(xc, w.t()));
    return;
  }
  switch (xc.scalar_type()) {
    case at::kFloat: run_skinny_linear<float>(xc, w, b, out, col); break;
    case at::kBFloat16: run_skinny_linear<c10::BFloat16>(xc, w, b, out, col); break;
    default: run_skinny_linear<c10::Half>(xc, w, b, out, col); break;
  }
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_skinny_linear_args(x, weight, bias);
  const at::Tensor xc = x.contiguous();
  if (!skinny_takes(weight.scalar_type(), x.size(0))) {  // a real GEMM: BLAS's own output, no copy
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    const at::Tensor w = weight.contiguous();
    return bias.has_value() ? at::addmm(bias->contiguous(), xc, w.t()) : at::mm(xc, w.t());
  }
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  if (out.numel() > 0) linear_into(xc, weight, bias, out, 0);
  return out;
}

// out [M, N] = silu(y[:, :N]) * y[:, N:] for y [M, 2N] (SwiGLU's inner rows), in fp32 and rounded once
template <typename W>
void glu_epilogue(const at::Tensor& y, at::Tensor& out) {
  const int64_t M = out.size(0), N = out.size(1);
  const W* in = y.const_data_ptr<W>();
  W* o = out.data_ptr<W>();
  at::parallel_for(0, M * N, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / N, n = i % N;
      const float gate = float(in[m * 2 * N + n]), up = float(in[m * 2 * N + N + n]);
      o[i] = W(gate / (1.f + std::exp(-gate)) * up);
    }
  });
}

at::Tensor skinny_linear_multi_cpu(const at::Tensor& x, at::TensorList weights,
                                   const c10::List<std::optional<at::Tensor>>& biases, bool glu) {
  check_skinny_linear_multi_args(x, weights, biases, glu);
  const at::Tensor xc = x.contiguous();
  int64_t total = 0;
  for (const at::Tensor& w : weights) total += w.size(0);
  at::Tensor y = at::empty({x.size(0), total}, x.options());
  if (y.numel() == 0) return glu ? at::empty({x.size(0), total / 2}, x.options()) : y;
  int64_t col = 0;
  for (size_t i = 0; i < weights.size(); col += weights[i].size(0), ++i) linear_into(xc, weights[i], biases.get(i), y, col);
  if (!glu) return y;
  at::Tensor out = at::empty({x.size(0), total / 2}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: glu_epilogue<float>(y, out); break;
    case at::kBFloat16: glu_epilogue<c10::BFloat16>(y, out); break;
    default: glu_epilogue<c10::Half>(y, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) {
  m.impl("skinny_linear", &skinny_linear_cpu);
  m.impl("skinny_linear_multi", &skinny_linear_multi_cpu);
}

}  // namespace lcm_fast
