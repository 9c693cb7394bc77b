// Building blocks of the decoding-step layer ops (denoiser_layers_cpu.cpp, decoder_layers_cpu.cpp): a
// layer's parameters with the skinny-linear and AdaLN-row kernels, the FFN sublayer, one-query attention
// over a KV cache. Their specifications are the _ref functions of python/lcm_fast/ops/{denoiser,decoder}.py.
// Torch headers: never include from a .cu file.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adaln/adaln.h"
#include "adaln/adaln_host.h"
#include "common/dot_tile.h"
#include "linear/skinny_linear_checks.h"
#include "linear/skinny_linear_cpu.h"

namespace lcm_fast::decode {

// The FFN activation (ACTIVATIONS in python/lcm_fast/ops/denoiser.py, with torch's module defaults); kSwiGLU gates with SiLU.
enum class Act { kSwiGLU, kReLU, kTanh, kELU, kLeakyReLU, kPReLU, kSELU, kGELU, kSiLU, kSoftsign, kSigmoid, kHardsigmoid };

inline Act parse_activation(const char* op, std::string_view name) {
  static constexpr std::pair<std::string_view, Act> kNames[] = {
      {"swiglu", Act::kSwiGLU}, {"relu", Act::kReLU}, {"tanh", Act::kTanh}, {"elu", Act::kELU},
      {"leaky_relu", Act::kLeakyReLU}, {"prelu", Act::kPReLU}, {"selu", Act::kSELU}, {"gelu", Act::kGELU},
      {"silu", Act::kSiLU}, {"softsign", Act::kSoftsign}, {"sigmoid", Act::kSigmoid},
      {"hardsigmoid", Act::kHardsigmoid}};
  for (const auto& [n, act] : kNames)
    if (n == name) return act;
  TORCH_CHECK(false, op, ": unknown activation '", name, "'");
}

// elementwise in fp32; prelu_weight is PReLU's slope for this channel
inline float activate(Act act, float x, float prelu_weight) {
  switch (act) {
    case Act::kReLU: return x > 0.f || std::isnan(x) ? x : 0.f;
    case Act::kTanh: return std::tanh(x);
    case Act::kELU: return x > 0.f ? x : std::expm1(x);
    case Act::kLeakyReLU: return x > 0.f ? x : 0.01f * x;
    case Act::kPReLU: return x > 0.f ? x : prelu_weight * x;
    case Act::kSELU: return 1.0507009873554804934f * (x > 0.f ? x : 1.6732632423543772848f * std::expm1(x));
    case Act::kGELU: return 0.5f * x * (1.f + std::erf(x * float(M_SQRT1_2)));
    case Act::kSwiGLU:
    case Act::kSiLU: return x / (1.f + std::exp(-x));
    case Act::kSoftsign: return x / (1.f + std::abs(x));
    case Act::kSigmoid: return 1.f / (1.f + std::exp(-x));
    case Act::kHardsigmoid: return x <= -3.f ? 0.f : x >= 3.f ? 1.f : x / 6.f + 0.5f;
  }
  return x;
}

// The FFN's inner activation in place: u = act(g) * u with a gate g (swiglu), else u = act(u), over R rows
// of I; prelu: PReLU's slopes (1 or I, fp32) or undefined. In parallel, SiLU vectorised: run on one
// thread with scalar expf it took ~5% of a step at model dim 512, the other thread idle.
template <typename T>
void activate_inner(Act act, T* u, const T* g, int64_t R, int64_t I, const at::Tensor& prelu) {
  const float* slope = prelu.defined() ? prelu.const_data_ptr<float>() : nullptr;
  const int64_t slopes = prelu.defined() ? prelu.numel() : 1;
  const T* x = g ? g : u;
  at::parallel_for(0, R * I, 2048, [&](int64_t begin, int64_t end) {
    float a[Vec::size()];
    for (int64_t i = begin; i < end; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), end - i);
      if (act == Act::kSwiGLU || act == Act::kSiLU) {
        const Vec v = n == Vec::size() ? load_f32(x + i) : load_f32(x + i, n);
        (v / (Vec(1.f) + v.neg().exp())).store(a, int(n));
      } else {
        for (int64_t j = 0; j < n; ++j)
          a[j] = activate(act, float(x[i + j]), slope ? slope[slopes == 1 ? 0 : (i + j) % I] : 0.f);
      }
      for (int64_t j = 0; j < n; ++j) u[i + j] = g ? T(float(T(a[j])) * float(u[i + j])) : T(a[j]);
    }
  });
}

template <typename T>
struct Layer {
  static constexpr DType kDType = std::is_same_v<T, float>          ? DType::kFloat32
                                  : std::is_same_v<T, c10::BFloat16> ? DType::kBFloat16
                                                                     : DType::kFloat16;
  const char* op;                                      // for error messages
  const c10::List<std::optional<at::Tensor>>& params;  // every layer's, layer after layer (or io_params)
  int64_t base;                                        // this layer's first entry
  bool rms;
  float eps;

  // the same parameters from entry `offset` of this layer on (a sublayer's block)
  Layer block(int offset) const { return Layer{op, params, base + offset, rms, eps}; }

  std::optional<at::Tensor> get(int64_t p) const { return params.get(base + p); }

  bool has(int p) const {
    const std::optional<at::Tensor> t = get(p);
    return t && t->defined();
  }

  const T* ptr(int p) const {
    const std::optional<at::Tensor> t = get(p);
    return t && t->defined() ? t->template const_data_ptr<T>() : nullptr;
  }

  // out [M, N] = x [M, K] W^T + b with W = params[w] (of type T, or packed): the skinny kernel, or BLAS for a
  // real GEMM.
  void linear(const T* x, int64_t M, int w, T* out) const {
    const at::Tensor weight = *get(w);
    const int64_t N = weight.size(0), K = weight_k(weight);
    if (is_packed(weight))
      return visit_packed(weight, [&](auto q) {
        skinny_linear_kernel(x, M, K, q, packed_scales(weight), ptr(w + 1), N, out, N);
      });
    if (skinny_takes(weight.scalar_type(), M))
      return skinny_linear_kernel(x, M, K, ptr(w), nullptr, ptr(w + 1), N, out, N);
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // inference only: BLAS on the weights needs no graph
    const auto opts = weight.options();
    at::Tensor xt = at::from_blob(const_cast<T*>(x), {M, K}, opts), yt = at::from_blob(out, {M, N}, opts);
    const std::optional<at::Tensor> bias = get(w + 1);
    if (bias && bias->defined()) at::addmm_out(yt, *bias, xt, weight.t());
    else at::mm_out(yt, xt, weight.t());
  }

  // y = norm(x) (1 + scale) + shift per row, with one [D] shift/scale for every row (null: plain norm);
  // with a branch: r = x + gate branch is written back to x first (the gated residual). y may be x:
  // the AdaLN kernel reads a whole row into scratch before it writes that row.
  void norm(T* x, const T* branch, const T* gate, const T* shift, const T* scale, int w, int64_t rows, int64_t D,
            T* y, const T* zeros) const {
    std::vector<float> widened;
    const float *weight = norm_param(w, D, widened), *bias = norm_param(w + 1, D, widened);
    adaln_forward_cpu(x, branch ? x : nullptr, branch, gate, shift ? shift : zeros, scale ? scale : zeros,
                      /*mod_stride=*/0, weight, bias, branch ? x : nullptr, y, rows, D, rms, eps, kDType, nullptr);
  }

  // a norm's weight or bias as fp32 [D] (the AdaLN kernel's layout), or null: the parameter's own data, or
  // bf16/fp16 ones widened into `widened` (appended; reserve for two). A tensor .to(float) here cost ~4 us,
  // 7 % of a bf16 step at model dim 512.
  const float* norm_param(int p, int64_t D, std::vector<float>& widened) const {
    const std::optional<at::Tensor> t = get(p);
    if (!t || !t->defined()) return nullptr;
    TORCH_CHECK(t->numel() == D, op, ": parameter ", base + p, " must have ", D, " elements");
    if constexpr (std::is_same_v<T, float>) {
      return t->template const_data_ptr<float>();
    } else {
      if (widened.capacity() < size_t(2 * D)) widened.reserve(2 * D);
      const size_t start = widened.size();
      const T* data = t->template const_data_ptr<T>();
      widened.insert(widened.end(), data, data + D);
      return widened.data() + start;
    }
  }
};

// out[r] = softmax(q[r] . K_b / sqrt(hd)) V_b per head, b = rows[r] (or r): q, out [C, H * hd];
// keys/values [B, H, capacity, hd] with the first L positions valid. fp32 throughout.
template <typename T>
void attend(const T* q, int64_t C, const T* keys, const T* values, const int64_t* rows, int64_t H, int64_t capacity,
            int64_t hd, int64_t L, T* out) {
  constexpr auto& kDots = DotTiles<1, 4, T>::kTable;
  const float scale = 1.f / std::sqrt(float(hd));
  at::parallel_for(0, C * H, std::max<int64_t>(1, 16384 / (L * hd)), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(hd), acc(hd), p(L);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / H, head = i % H, b = rows ? rows[r] : r;
      const T* k = keys + (b * H + head) * capacity * hd;
      const T* v = values + (b * H + head) * capacity * hd;
      for (int64_t d = 0; d < hd; ++d) qf[d] = float(q[r * H * hd + head * hd + d]);
      float top = -INFINITY;
      for (int64_t j = 0; j < L; j += 4) {
        const int n = int(std::min<int64_t>(4, L - j));
        kDots[0][n - 1](qf.data(), hd, k + j * hd, hd, hd, p.data() + j);
        for (int c = 0; c < n; ++c) top = std::max(top, p[j + c] *= scale);
      }
      float sum = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < L; ++j) {
        const float w = std::exp(p[j] - top);
        sum += w;
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * float(v[j * hd + d]);
      }
      for (int64_t d = 0; d < hd; ++d) out[r * H * hd + head * hd + d] = T(acc[d] / sum);
    }
  });
}

// Scratch of one layer: y, a, q, k, v, o, c, f [R, D]; g, u [R, I]; zeros [max(D, I)].
template <typename T>
struct Scratch {
  at::Tensor buffer;
  T *y, *a, *q, *k, *v, *o, *c, *f, *g, *u, *zeros;

  Scratch(int64_t R, int64_t D, int64_t I, const at::TensorOptions& options)
      : buffer(at::empty({8 * R * D + 2 * R * I + std::max(D, I)}, options)) {
    y = buffer.data_ptr<T>(), a = y + R * D, q = a + R * D, k = q + R * D, v = k + R * D, o = v + R * D;
    c = o + R * D, f = c + R * D, g = f + R * D, u = g + R * I, zeros = u + R * I;
    std::fill(zeros, zeros + std::max(D, I), T(0.f));
  }
};

// The layers' caches: one keys and one values tensor per layer, each contiguous [B, H, capacity, D / H] of one
// shape and of the activations' dtype.
inline void check_caches(const char* op, at::TensorList keys, at::TensorList values, int64_t D, at::ScalarType dtype) {
  TORCH_CHECK(!keys.empty() && values.size() == keys.size(), op, ": one keys and one values tensor per layer, got ",
              keys.size(), " and ", values.size());
  for (size_t l = 0; l < keys.size(); ++l) {
    const at::Tensor &k = keys[l], &v = values[l];
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                    k.size(1) * k.size(3) == D && k.sizes() == keys[0].sizes(),
                op, ": keys/values of every layer must be contiguous [B, H, capacity, D / H] of one shape, layer ", l,
                " has ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, op, ": keys and values must be ", dtype);
  }
}

// Every tensor of a parameter list (`name` in errors) contiguous, of h's dtype (a projection's weight may be packed
// int8 or fp8 instead) and on its device.
inline void check_params(const char* op, const char* name, const c10::List<std::optional<at::Tensor>>& list,
                         const at::Tensor& h) {
  for (int64_t i = 0; i < int64_t(list.size()); ++i) {
    const std::optional<at::Tensor> p = list.get(i);
    if (!p || !p->defined()) continue;
    const bool dtype = p->scalar_type() == h.scalar_type() || (is_packed(*p) && p->dim() == 2);
    TORCH_CHECK(p->is_contiguous() && p->device() == h.device() && dtype, op, ": ", name, "[", i,
                "] must be contiguous, ", h.scalar_type(), " (a weight: or packed int8/fp8) and on ", h.device());
  }
}

// f(T{}) for the decode ops' dtypes (fp32, bf16, fp16), else an error naming op.
template <typename F>
void dispatch_dtype(const char* op, at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", dtype, " (float32, bfloat16, float16)");
  }
}

// A layer's FFN entries, from the FFN norm's weight on (FFN_TENSORS in python/lcm_fast/ops/denoiser.py).
enum FfnParam : int {
  kFfNormW, kFfNormB, kGateW, kGateB, kInnerW, kInnerB, kActW, kInnerNormW, kInnerNormB, kFfOutW, kFfOutB, kNumFfnParams
};

// The FFN sublayer on normed rows y [R, D]: h += ffn(y), or h += gate * ffn(y) rounded to T after the product
// (as h + g * ffn(y) is) with a gate [D]; `ffn` holds FfnParam entries; g, u [R, I] and f [R, D] scratch;
// inner_norm: the normformer norm of the inner activations (not with SwiGLU).
template <typename T>
void ffn_decode(T* h, const T* y, int64_t R, int64_t D, const Layer<T>& ffn, Act act, bool inner_norm, const T* gate,
                T* g, T* u, T* f, const T* zeros) {
  const int64_t I = ffn.get(kInnerW)->size(0);
  const bool swiglu = act == Act::kSwiGLU;
  ffn.linear(y, R, kInnerW, u);
  if (swiglu) ffn.linear(y, R, kGateW, g);
  const at::Tensor prelu = act == Act::kPReLU ? ffn.get(kActW)->to(at::kFloat).contiguous() : at::Tensor();
  activate_inner<T>(act, u, swiglu ? g : nullptr, R, I, prelu);
  if (inner_norm && !swiglu) {
    ffn.norm(u, nullptr, nullptr, nullptr, nullptr, kInnerNormW, R, I, u, zeros);
  }
  ffn.linear(u, R, kFfOutW, f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) {
      const float branch = gate ? float(T(float(gate[d]) * float(f[r * D + d]))) : float(f[r * D + d]);
      h[r * D + d] = T(float(h[r * D + d]) + branch);
    }
}

}  // namespace lcm_fast::decode
