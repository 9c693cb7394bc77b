// Host side of the AdaLN ops, shared by the CPU and CUDA bindings: argument checks, [N, D] views,
// output allocation, fp32 weight/bias. `Forward`/`Backward` are the device's raw-pointer kernels
// (signatures of launch_adaln_forward / launch_adaln_backward in adaln.h). Includes torch headers:
// never include from a .cu file.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "adaln/adaln.h"

namespace lcm_fast {

inline DType adaln_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "adaln ops: unsupported dtype ", t.scalar_type(), " (float32, bfloat16, float16)");
  }
}

// Checks that every activation has ref's shape, dtype, device and is contiguous.
inline void adaln_check_like(const char* op, const at::Tensor& ref, std::initializer_list<const at::Tensor*> others) {
  TORCH_CHECK(ref.dim() >= 1 && ref.size(-1) > 0, op, ": inputs need a non-empty last dim, got ", ref.sizes());
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->sizes() == ref.sizes(), op, ": every activation must have shape ", ref.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == ref.scalar_type() && t->device() == ref.device(), op,
                ": activations need one dtype and device (", ref.scalar_type(), " on ", ref.device(), ")");
    TORCH_CHECK(t->is_contiguous(), op, ": activations must be contiguous");
  }
}

// The modulations' row stride: D when each has ref's shape, 0 when each is one row of D elements for every row
// (shape [D], [1, D], ...); checked like activations otherwise.
inline int64_t adaln_mod_stride(const char* op, const at::Tensor& ref, std::initializer_list<const at::Tensor*> mods) {
  const int64_t D = ref.size(-1);
  bool broadcast = true;
  for (const at::Tensor* t : mods) broadcast = broadcast && t->dim() >= 1 && t->numel() == D && t->size(-1) == D;
  if (!broadcast) {
    TORCH_CHECK(std::all_of(mods.begin(), mods.end(), [&](const at::Tensor* t) { return t->sizes() == ref.sizes(); }),
                op, ": the modulations (gate, shift, scale) must all have the input's shape ", ref.sizes(),
                " or all be one row of ", D, " for every row");
    adaln_check_like(op, ref, mods);
    return D;
  }
  for (const at::Tensor* t : mods) {
    TORCH_CHECK(t->scalar_type() == ref.scalar_type() && t->device() == ref.device() && t->is_contiguous(), op,
                ": a modulation row needs the input's dtype and device (", ref.scalar_type(), " on ", ref.device(),
                ") and to be contiguous");
  }
  return 0;
}

// weight/bias as fp32 [D] on x's device (or an undefined tensor).
inline at::Tensor adaln_param(const char* op, const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), op, ": weight/bias must be [", x.size(-1), "], got ",
              p->sizes());
  TORCH_CHECK(p->device() == x.device(), op, ": weight/bias must be on ", x.device());
  return p->to(at::kFloat).contiguous();
}

inline const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

template <typename Forward>
at::Tensor adaln_norm_modulate_host(Forward forward, const at::Tensor& x, const at::Tensor& shift,
                                    const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, bool rms, double eps, void* stream) {
  const char* op = "adaln_norm_modulate";
  adaln_check_like(op, x, {&x});
  const int64_t mod_stride = adaln_mod_stride(op, x, {&shift, &scale});
  const at::Tensor w = adaln_param(op, weight, x), b = adaln_param(op, bias, x);
  at::Tensor y = at::empty_like(x);
  const int64_t D = x.size(-1);
  forward(x.const_data_ptr(), nullptr, nullptr, nullptr, shift.const_data_ptr(), scale.const_data_ptr(), mod_stride,
          ptr_or_null(w), ptr_or_null(b), nullptr, y.data_ptr(), x.numel() / D, D, rms, static_cast<float>(eps),
          adaln_dtype(x), stream);
  return y;
}

template <typename Forward>
std::tuple<at::Tensor, at::Tensor> adaln_gated_residual_norm_modulate_host(
    Forward forward, const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& gate,
    const at::Tensor& shift, const at::Tensor& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool rms, double eps, void* stream) {
  const char* op = "adaln_gated_residual_norm_modulate";
  adaln_check_like(op, residual, {&residual, &branch});
  const int64_t mod_stride = adaln_mod_stride(op, residual, {&gate, &shift, &scale});
  const at::Tensor w = adaln_param(op, weight, residual), b = adaln_param(op, bias, residual);
  at::Tensor r = at::empty_like(residual), y = at::empty_like(residual);
  const int64_t D = residual.size(-1);
  forward(nullptr, residual.const_data_ptr(), branch.const_data_ptr(), gate.const_data_ptr(), shift.const_data_ptr(),
          scale.const_data_ptr(), mod_stride, ptr_or_null(w), ptr_or_null(b), r.data_ptr(), y.data_ptr(), residual.numel() / D, D,
          rms, static_cast<float>(eps), adaln_dtype(residual), stream);
  return {r, y};
}

template <typename Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> adaln_norm_modulate_backward_host(
    Backward backward, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool rms, double eps,
    void* stream) {
  const char* op = "adaln_norm_modulate_backward";
  adaln_check_like(op, x, {&grad_y, &x, &scale});
  const at::Tensor w = adaln_param(op, weight, x), b = adaln_param(op, bias, x);
  const int64_t D = x.size(-1);
  at::Tensor grad_x = at::empty_like(x), grad_scale = at::empty_like(x);
  at::Tensor grad_w = at::zeros({D}, x.options().dtype(at::kFloat)), grad_b = at::zeros({D}, x.options().dtype(at::kFloat));
  backward(grad_y.const_data_ptr(), x.const_data_ptr(), scale.const_data_ptr(), ptr_or_null(w), ptr_or_null(b),
           grad_x.data_ptr(), grad_scale.data_ptr(), grad_w.data_ptr<float>(), grad_b.data_ptr<float>(), x.numel() / D,
           D, rms, static_cast<float>(eps), adaln_dtype(x), stream);
  return {grad_x, grad_scale, grad_w, grad_b};
}

}  // namespace lcm_fast
