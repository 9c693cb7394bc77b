// CPU skinny linear op: checks, layouts and dtype dispatch around skinny_linear_cpu.h.
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "linear/skinny_linear_checks.h"
#include "linear/skinny_linear_cpu.h"

namespace lcm_fast {
namespace {

template <typename W>
void run_skinny_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, at::Tensor& out) {
  skinny_linear_kernel(x.const_data_ptr<W>(), x.size(0), x.size(1), w.const_data_ptr<W>(),
                       b.defined() ? b.const_data_ptr<W>() : nullptr, w.size(0), out.data_ptr<W>());
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_skinny_linear_args(x, weight, bias);
  const at::Tensor xc = x.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (!skinny_takes(w.scalar_type(), x.size(0))) {  // a real GEMM (skinny_linear_cpu.h)
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // inference only, as the kernel
    return b.defined() ? at::addmm(b, xc, w.t()) : at::mm(xc, w.t());
  }
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (out.numel() == 0) return out;
  switch (w.scalar_type()) {
    case at::kFloat: run_skinny_linear<float>(xc, w, b, out); break;
    case at::kBFloat16: run_skinny_linear<c10::BFloat16>(xc, w, b, out); break;
    default: run_skinny_linear<c10::Half>(xc, w, b, out); break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) { m.impl("skinny_linear", &skinny_linear_cpu); }

}  // namespace lcm_fast
