// CPU denoiser_layers_decode: the AdaLN denoiser layers for the few rows of a decoding step, the
// specification being denoiser_layers_decode_ref in python/lcm_fast/ops/denoiser.py. The fast engine
// calls it once per DDIM step. Issued from Python as ~20 small ops per layer, a layer took 4.6x as long
// at model dim 256 (bench/RESULTS.md); here the same kernels run back to back (AdaLN rows, skinny
// linear, a one-query attention over the cached keys) on one scratch buffer, layer after layer.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "adaln/adaln.h"
#include "adaln/adaln_host.h"
#include "common/dot_tile.h"
#include "linear/skinny_linear_cpu.h"

namespace lcm_fast {
namespace {

// Entries of one layer's `params`, in the order of LAYER_PARAMS (python/lcm_fast/ops/denoiser.py).
enum Param : int {
  kSaNormW, kSaNormB, kVW, kVB, kSaOutW, kSaOutB, kSaPostNormW, kSaPostNormB,
  kCaNormW, kCaNormB, kQW, kQB, kQNormW, kQNormB, kCaOutW, kCaOutB,
  kFfNormW, kFfNormB, kGateW, kGateB, kInnerW, kInnerB, kActW, kInnerNormW, kInnerNormB, kFfOutW, kFfOutB,
  kNumParams
};

// Entries of `io_params` (IO_PARAMS in ops/denoiser.py): the denoiser's input and output stages.
enum IoParam : int { kInW, kInB, kInOffset, kFinalNormW, kFinalNormB, kOutW, kOutB, kNumIoParams };

// Modulation rows: (shift, scale, gate) of self-attention, cross-attention, FFN.
enum Mod : int { kShSa, kScSa, kGSa, kShCa, kScCa, kGCa, kShFf, kScFf, kGFf };

// The FFN activation (ACTIVATIONS in ops/denoiser.py, with torch's module defaults); kSwiGLU gates with SiLU.
enum class Act { kSwiGLU, kReLU, kTanh, kELU, kLeakyReLU, kPReLU, kSELU, kGELU, kSiLU, kSoftsign, kSigmoid, kHardsigmoid };

Act parse_activation(std::string_view name) {
  static constexpr std::pair<std::string_view, Act> kNames[] = {
      {"swiglu", Act::kSwiGLU}, {"relu", Act::kReLU}, {"tanh", Act::kTanh}, {"elu", Act::kELU},
      {"leaky_relu", Act::kLeakyReLU}, {"prelu", Act::kPReLU}, {"selu", Act::kSELU}, {"gelu", Act::kGELU},
      {"silu", Act::kSiLU}, {"softsign", Act::kSoftsign}, {"sigmoid", Act::kSigmoid},
      {"hardsigmoid", Act::kHardsigmoid}};
  for (const auto& [n, act] : kNames)
    if (n == name) return act;
  TORCH_CHECK(false, "denoiser_layers_decode: unknown activation '", name, "'");
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
  const c10::List<std::optional<at::Tensor>>& params;  // every layer's, layer after layer (or io_params)
  int64_t base;                                        // this layer's first entry
  bool rms;
  float eps;

  std::optional<at::Tensor> get(int64_t p) const { return params.get(base + p); }

  const T* ptr(int p) const {
    const std::optional<at::Tensor> t = get(p);
    return t && t->defined() ? t->template const_data_ptr<T>() : nullptr;
  }

  // out [M, N] = x [M, K] W^T + b with W = params[w]: the skinny kernel, or BLAS for a real GEMM.
  void linear(const T* x, int64_t M, int w, T* out) const {
    const at::Tensor weight = *get(w);
    const int64_t N = weight.size(0), K = weight.size(1);
    if (M <= kSkinnyMaxRows) return skinny_linear_kernel<T>(x, M, K, ptr(w), ptr(w + 1), N, out);
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
    const at::Tensor weight = norm_param(w, D), bias = norm_param(w + 1, D);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * D;
      adaln_forward_cpu(x + o, branch ? x + o : nullptr, branch ? branch + o : nullptr, gate, shift ? shift : zeros,
                        scale ? scale : zeros, ptr_or_null(weight), ptr_or_null(bias), branch ? x + o : nullptr, y + o,
                        1, D, rms, eps, kDType, nullptr);
    }
  }

  // a norm's weight or bias as fp32 [D] (the AdaLN kernel's layout), or undefined
  at::Tensor norm_param(int p, int64_t D) const {
    const std::optional<at::Tensor> t = get(p);
    if (!t || !t->defined()) return at::Tensor();
    TORCH_CHECK(t->numel() == D, "denoiser_layers_decode: parameter ", base + p, " must have ", D, " elements");
    return t->scalar_type() == at::kFloat ? *t : t->to(at::kFloat);
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

// Scratch of one layer: y, a, q, o, c, f [R, D]; g, u [R, I]; zeros [max(D, I)].
template <typename T>
struct Scratch {
  at::Tensor buffer;
  T *y, *a, *q, *o, *c, *f, *g, *u, *zeros;

  Scratch(int64_t R, int64_t D, int64_t I, const at::TensorOptions& options)
      : buffer(at::empty({6 * R * D + 2 * R * I + std::max(D, I)}, options)) {
    y = buffer.data_ptr<T>(), a = y + R * D, q = a + R * D, o = q + R * D, c = o + R * D, f = c + R * D;
    g = f + R * D, u = g + R * I, zeros = u + R * I;
    std::fill(zeros, zeros + std::max(D, I), T(0.f));
  }
};

// One layer, in place on h [R, D]; mods [9, D] its modulation rows, uncond_cross [D].
template <typename T>
void layer_decode(T* h, int64_t R, int64_t D, const T* mods, const Layer<T>& layer, const at::Tensor& keys,
                  const at::Tensor& values, int64_t length, const int64_t* rows, int64_t C, const T* uncond_cross,
                  Act act, bool post_norms, bool qk_norm, const Scratch<T>& s) {
  const int64_t I = layer.get(kInnerW)->size(0);  // FFN inner dim
  const bool swiglu = act == Act::kSwiGLU;
  auto mod = [&](Mod m) { return mods + m * D; };
  T *y = s.y, *a = s.a, *q = s.q, *o = s.o, *c = s.c, *f = s.f, *g = s.g, *u = s.u;
  const T* zeros = s.zeros;

  // self-attention over one position: output_proj(v_proj(y)), or v_proj(y) when v_proj is the product of
  // both (no output_proj weight) [+ normformer norm]
  layer.norm(h, nullptr, nullptr, mod(kShSa), mod(kScSa), kSaNormW, R, D, y, zeros);
  if (layer.ptr(kSaOutW)) {
    layer.linear(y, R, kVW, q);
    layer.linear(q, R, kSaOutW, a);
  } else {
    layer.linear(y, R, kVW, a);
  }
  if (post_norms) {
    layer.norm(a, nullptr, nullptr, nullptr, nullptr, kSaPostNormW, R, D, a, zeros);
  }
  layer.norm(h, a, mod(kGSa), mod(kShCa), mod(kScCa), kCaNormW, R, D, y, zeros);

  // cross-attention: conditional rows attend over their document's cached keys, the rest see the zero key only
  if (C > 0) {
    layer.linear(y, C, kQW, q);
    if (qk_norm) {
      layer.norm(q, nullptr, nullptr, nullptr, nullptr, kQNormW, C, D, q, zeros);
    }
    const int64_t H = keys.size(1);
    attend<T>(q, C, keys.const_data_ptr<T>(), values.const_data_ptr<T>(), rows, H, keys.size(2), D / H, length, o);
    layer.linear(o, C, kCaOutW, c);
  }
  for (int64_t r = C; r < R; ++r) std::copy(uncond_cross, uncond_cross + D, c + r * D);
  layer.norm(h, c, mod(kGCa), mod(kShFf), mod(kScFf), kFfNormW, R, D, y, zeros);

  // FFN, then h += gate * ffn (rounded to T after the product, as h + g * ffn(y) is)
  layer.linear(y, R, kInnerW, u);
  if (swiglu) layer.linear(y, R, kGateW, g);
  const at::Tensor prelu = act == Act::kPReLU ? layer.get(kActW)->to(at::kFloat).contiguous() : at::Tensor();
  activate_inner<T>(act, u, swiglu ? g : nullptr, R, I, prelu);
  if (post_norms && !swiglu) {
    layer.norm(u, nullptr, nullptr, nullptr, nullptr, kInnerNormW, R, I, u, zeros);
  }
  layer.linear(u, R, kFfOutW, f);
  const T* g_ff = mod(kGFf);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) h[r * D + d] = T(float(h[r * D + d]) + float(T(float(g_ff[d]) * float(f[r * D + d]))));
}


at::Tensor denoiser_layers_decode_cpu(const at::Tensor& h, const at::Tensor& modulations,
                                      const c10::List<std::optional<at::Tensor>>& params, at::TensorList keys,
                                      at::TensorList values, int64_t length, const std::optional<at::Tensor>& rows,
                                      int64_t num_cond, const at::Tensor& uncond_cross, bool rms, double eps,
                                      c10::string_view activation, bool post_norms, bool qk_norm,
                                      const c10::List<std::optional<at::Tensor>>& io_params) {
  const char* op = "denoiser_layers_decode";
  const int64_t L = int64_t(keys.size());
  TORCH_CHECK(L > 0 && int64_t(values.size()) == L, op, ": one keys and one values tensor per layer, got ", L,
              " and ", values.size());
  TORCH_CHECK(int64_t(params.size()) == L * kNumParams, op, ": params needs ", int(kNumParams), " entries per layer (",
              L * kNumParams, "), got ", params.size());
  TORCH_CHECK(io_params.empty() || int64_t(io_params.size()) == kNumIoParams, op, ": io_params must be empty or have ",
              int(kNumIoParams), " entries (IO_PARAMS), got ", io_params.size());
  const bool io = !io_params.empty();
  auto io_param = [&](int p) { return io ? io_params.get(p) : std::optional<at::Tensor>(); };
  const std::optional<at::Tensor> in_w = io_param(kInW), out_w = io_param(kOutW);
  TORCH_CHECK(!io || (in_w && in_w->dim() == 2 && out_w && out_w->dim() == 2), op,
              ": io_params needs the input and output projection weights");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), op, ": h must be a contiguous [R, ", io ? "S" : "D", "] tensor, got ",
              h.sizes());
  const int64_t R = h.size(0), D = io ? in_w->size(0) : h.size(1);
  if (io) {
    TORCH_CHECK(in_w->size(1) == h.size(1) && out_w->size(1) == D, op, ": projections [D, S] and [S', D] expected for h ",
                h.sizes(), ", got ", in_w->sizes(), " and ", out_w->sizes());
    for (int p : {kInB, kInOffset})
      TORCH_CHECK(!io_param(p) || io_param(p)->numel() == D, op, ": io_params[", p, "] must have ", D, " elements");
    TORCH_CHECK(!io_param(kOutB) || io_param(kOutB)->numel() == out_w->size(0), op, ": io_params[", int(kOutB),
                "] must have ", out_w->size(0), " elements");
  }
  TORCH_CHECK(modulations.sizes() == at::IntArrayRef({L, 9, D}) && modulations.is_contiguous(), op,
              ": modulations must be a contiguous [", L, ", 9, ", D, "], got ", modulations.sizes());
  TORCH_CHECK(uncond_cross.sizes() == at::IntArrayRef({L, D}) && uncond_cross.is_contiguous(), op,
              ": uncond_cross must be a contiguous [", L, ", ", D, "], got ", uncond_cross.sizes());
  TORCH_CHECK(0 <= num_cond && num_cond <= R, op, ": num_cond ", num_cond, " outside [0, ", R, "]");
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor &k = keys[l], &v = values[l];
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.is_contiguous() && v.is_contiguous() &&
                    k.size(1) * k.size(3) == D && k.sizes() == keys[0].sizes(),
                op, ": keys/values of every layer must be contiguous [B, H, capacity, D / H] of one shape, layer ", l,
                " has ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK(k.scalar_type() == h.scalar_type() && v.scalar_type() == h.scalar_type(), op,
                ": keys and values must be ", h.scalar_type());
  }
  TORCH_CHECK(0 < length && length <= keys[0].size(2), op, ": length ", length, " outside [1, ", keys[0].size(2), "]");
  at::Tensor row_index;
  if (rows) {
    row_index = rows->scalar_type() == at::kLong && rows->is_contiguous() ? *rows : rows->to(at::kLong).contiguous();
    TORCH_CHECK(row_index.numel() == num_cond, op, ": rows must have num_cond = ", num_cond, " entries");
    const int64_t* index = row_index.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < num_cond; ++r)
      TORCH_CHECK(0 <= index[r] && index[r] < keys[0].size(0), op, ": rows[", r, "] = ", index[r],
                  " is not a batch row of the cache (", keys[0].size(0), ")");
  } else {
    TORCH_CHECK(num_cond <= keys[0].size(0), op, ": ", num_cond, " conditional rows but the cache has ",
                keys[0].size(0));
  }
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()));
  for (const auto* list : {&params, &io_params})
    for (int64_t i = 0; i < int64_t(list->size()); ++i) {
      const std::optional<at::Tensor> p = list->get(i);
      if (!p || !p->defined()) continue;
      TORCH_CHECK(p->is_contiguous() && p->device() == h.device() && p->scalar_type() == h.scalar_type(), op, ": ",
                  list == &params ? "params[" : "io_params[", i, "] must be contiguous, ", h.scalar_type(), " and on ",
                  h.device());
    }
  int64_t inner = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (Param w : {kVW, kQW, kCaOutW, kInnerW, kFfOutW, act == Act::kSwiGLU ? kGateW : kInnerW,
                    act == Act::kPReLU ? kActW : kInnerW}) {
      const std::optional<at::Tensor> p = params.get(l * kNumParams + w);
      TORCH_CHECK(p && p->defined(), op, ": params[", l * kNumParams + w, "] is None (",
                  act == Act::kSwiGLU ? "swiglu needs the gate projection" : "a projection weight", ")");
    }
    inner = std::max(inner, params.get(l * kNumParams + kInnerW)->size(0));
  }
  TORCH_CHECK(modulations.scalar_type() == h.scalar_type() && uncond_cross.scalar_type() == h.scalar_type(), op,
              ": modulations and uncond_cross must be ", h.scalar_type());
  const int64_t* row_ptr = rows ? row_index.const_data_ptr<int64_t>() : nullptr;
  // with io_params: x [R, S] -> h = x W_in^T + b_in + offset, the layers, y = W_out^T final_norm(h) + b_out
  at::Tensor hidden = io ? at::empty({R, D}, h.options()) : h.clone();
  at::Tensor out = io ? at::empty({R, out_w->size(0)}, h.options()) : hidden;
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const Scratch<T> scratch(R, D, inner, h.options());
    const Layer<T> stages{io_params, 0, rms, float(eps)};
    T* hp = hidden.data_ptr<T>();
    if (io) {
      stages.linear(h.const_data_ptr<T>(), R, kInW, hp);
      if (const T* offset = stages.ptr(kInOffset))
        for (int64_t i = 0; i < R * D; ++i) hp[i] = T(float(hp[i]) + float(offset[i % D]));
    }
    for (int64_t l = 0; l < L; ++l)
      layer_decode<T>(hp, R, D, modulations.const_data_ptr<T>() + l * 9 * D,
                      Layer<T>{params, l * kNumParams, rms, float(eps)}, keys[l], values[l], length, row_ptr, num_cond,
                      uncond_cross.const_data_ptr<T>() + l * D, act, post_norms, qk_norm, scratch);
    if (io) {
      stages.norm(hp, nullptr, nullptr, nullptr, nullptr, kFinalNormW, R, D, scratch.y, scratch.zeros);
      stages.linear(scratch.y, R, kOutW, out.data_ptr<T>());
    }
  };
  switch (h.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", h.scalar_type(), " (float32, bfloat16, float16)");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) { m.impl("denoiser_layers_decode", &denoiser_layers_decode_cpu); }

}  // namespace lcm_fast
