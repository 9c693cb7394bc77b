// Argument checks of skinny_linear, shared by the CPU and CUDA host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Optional.h>
#include <ATen/core/List.h>

#include <optional>

namespace lcm_fast {

// A packed weight (python/lcm_fast/ops/linear.py quantize_weight): [N, K + 4] bytes holding q [N, K] (row major) then
// the N fp32 row scales: W[n] = scale[n] * q[n]. Its dtype says the format of q: uint8 for int8 values, float8_e4m3fn
// for fp8 (e4m3) ones. The weight's K: its columns, less 4 for packed.
constexpr int64_t kPackedScaleBytes = 4;
inline bool is_packed(const at::Tensor& weight) {
  return weight.scalar_type() == at::kByte || weight.scalar_type() == at::kFloat8_e4m3fn;
}
inline int64_t weight_k(const at::Tensor& weight) {
  return weight.size(1) - (is_packed(weight) ? kPackedScaleBytes : 0);
}
// The scales of a contiguous packed weight.
inline const uint8_t* packed_scales(const at::Tensor& weight) {
  return static_cast<const uint8_t*>(weight.const_data_ptr()) + weight.size(0) * weight_k(weight);
}
// f(q) for the values q [N, K] of a contiguous packed weight, typed by its format: int8_t or c10::Float8_e4m3fn.
template <typename F>
decltype(auto) visit_packed(const at::Tensor& weight, F f) {
  const void* q = weight.const_data_ptr();
  if (weight.scalar_type() == at::kByte) return f(static_cast<const int8_t*>(q));
  return f(static_cast<const c10::Float8_e4m3fn*>(q));
}

inline void check_skinny_linear_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x must be [M, K] and weight [N, K], got ", x.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "skinny_linear: dtype must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(is_packed(weight) || x.scalar_type() == weight.scalar_type(), "skinny_linear: x is ",
              x.scalar_type(), " but weight is ", weight.scalar_type(), " (or packed: uint8 int8, float8_e4m3fn fp8)");
  TORCH_CHECK(weight_k(weight) >= 1 && x.size(1) == weight_k(weight), "skinny_linear: x has K=", x.size(1),
              " but weight has K=", weight_k(weight), is_packed(weight) ? " (packed: K + 4 columns)" : "");
  TORCH_CHECK(x.device() == weight.device(), "skinny_linear: x on ", x.device(), " but weight on ", weight.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "skinny_linear: bias must be [N=",
                weight.size(0), "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(),
                "skinny_linear: bias must match x in dtype and device");
  }
}

// skinny_linear_multi: one bias entry per weight, each pair as skinny_linear's; glu takes two weights of one N.
inline void check_skinny_linear_multi_args(const at::Tensor& x, at::TensorList weights,
                                           const c10::List<std::optional<at::Tensor>>& biases, bool glu) {
  TORCH_CHECK(!weights.empty() && biases.size() == weights.size(), "skinny_linear_multi: one bias entry (or None) per ",
              "weight, got ", weights.size(), " weights and ", biases.size(), " biases");
  for (size_t i = 0; i < weights.size(); ++i) check_skinny_linear_args(x, weights[i], biases.get(i));
  TORCH_CHECK(!glu || (weights.size() == 2 && weights[0].size(0) == weights[1].size(0)),
              "skinny_linear_multi: glu takes two weights with the same N (gate, then up)");
}

}  // namespace lcm_fast
