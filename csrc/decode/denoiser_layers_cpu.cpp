// CPU denoiser_layers_decode: the AdaLN denoiser layers for the few rows of a decoding step, the
// specification being denoiser_layers_decode_ref in python/lcm_fast/ops/denoiser.py. The fast engine
// calls it once per DDIM step. Issued from Python as ~20 small ops per layer, a layer took 4.6x as long
// at model dim 256 (bench/RESULTS.md); here the same kernels run back to back (AdaLN rows, skinny
// linear, a one-query attention over the cached keys) on one scratch buffer, layer after layer.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode/layer_decode.h"

namespace lcm_fast {
namespace {

using namespace decode;

// Entries of one layer's `params`, in the order of LAYER_TENSORS (python/lcm_fast/ops/denoiser.py).
enum Param : int {
  kSaNormW, kSaNormB, kVW, kVB, kSaOutW, kSaOutB, kSaPostNormW, kSaPostNormB,
  kCaNormW, kCaNormB, kQW, kQB, kQNormW, kQNormB, kCaOutW, kCaOutB
};
constexpr int kFfn = kCaOutB + 1;  // the FfnParam entries (layer_decode.h) from here
constexpr int kNumParams = kFfn + kNumFfnParams;

// Entries of `io_params` (IO_TENSORS in ops/denoiser.py): the denoiser's input and output stages.
enum IoParam : int { kInW, kInB, kInOffset, kFinalNormW, kFinalNormB, kOutW, kOutB, kNumIoParams };

// Modulation rows: (shift, scale, gate) of self-attention, cross-attention, FFN.
enum Mod : int { kShSa, kScSa, kGSa, kShCa, kScCa, kGCa, kShFf, kScFf, kGFf };

// One layer, in place on h [R, D]; mods [9, D] its modulation rows, uncond_cross [D].
template <typename T>
void layer_decode(T* h, int64_t R, int64_t D, const T* mods, const Layer<T>& layer, const at::Tensor& keys,
                  const at::Tensor& values, int64_t length, const int64_t* rows, int64_t C, const T* uncond_cross,
                  Act act, bool post_norms, bool qk_norm, const Scratch<T>& s) {
  auto mod = [&](Mod m) { return mods + m * D; };
  T *y = s.y, *a = s.a, *q = s.q, *o = s.o, *c = s.c;
  const T* zeros = s.zeros;

  // self-attention over one position: output_proj(v_proj(y)), or v_proj(y) when v_proj is the product of
  // both (no output_proj weight) [+ normformer norm]
  layer.norm(h, nullptr, nullptr, mod(kShSa), mod(kScSa), kSaNormW, R, D, y, zeros);
  if (layer.has(kSaOutW)) {
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

  layer.norm(h, c, mod(kGCa), mod(kShFf), mod(kScFf), kFfn + kFfNormW, R, D, y, zeros);
  ffn_decode<T>(h, y, R, D, layer.block(kFfn), act, post_norms, mod(kGFf), s.g, s.u, s.f, zeros);
}

at::Tensor denoiser_layers_decode_cpu(const at::Tensor& h, const at::Tensor& modulations,
                                      const c10::List<std::optional<at::Tensor>>& params, at::TensorList keys,
                                      at::TensorList values, int64_t length, const std::optional<at::Tensor>& rows,
                                      int64_t num_cond, const at::Tensor& uncond_cross, bool rms, double eps,
                                      c10::string_view activation, bool post_norms, bool qk_norm,
                                      const c10::List<std::optional<at::Tensor>>& io_params) {
  const char* op = "denoiser_layers_decode";
  const int64_t L = int64_t(keys.size());
  TORCH_CHECK(int64_t(params.size()) == L * kNumParams, op, ": params needs ", int(kNumParams), " entries per layer (",
              L * kNumParams, "), got ", params.size());
  TORCH_CHECK(io_params.empty() || int64_t(io_params.size()) == kNumIoParams, op, ": io_params must be empty or have ",
              int(kNumIoParams), " entries (IO_TENSORS), got ", io_params.size());
  const bool io = !io_params.empty();
  auto io_param = [&](int p) { return io ? io_params.get(p) : std::optional<at::Tensor>(); };
  const std::optional<at::Tensor> in_w = io_param(kInW), out_w = io_param(kOutW);
  TORCH_CHECK(!io || (in_w && in_w->dim() == 2 && out_w && out_w->dim() == 2), op,
              ": io_params needs the input and output projection weights");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), op, ": h must be a contiguous [R, ", io ? "S" : "D", "] tensor, got ",
              h.sizes());
  const int64_t R = h.size(0), D = io ? in_w->size(0) : h.size(1);
  if (io) {
    TORCH_CHECK(weight_k(*in_w) == h.size(1) && weight_k(*out_w) == D, op, ": projections [D, S] and [S', D] expected for h ",
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
  check_caches(op, keys, values, D, h.scalar_type());
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
  const Act act = parse_activation(op, std::string_view(activation.data(), activation.size()));
  check_params(op, "params", params, h);
  check_params(op, "io_params", io_params, h);
  int64_t inner = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (int w : {int(kVW), int(kQW), int(kCaOutW), kFfn + kInnerW, kFfn + kFfOutW,
                  kFfn + (act == Act::kSwiGLU ? kGateW : kInnerW), kFfn + (act == Act::kPReLU ? kActW : kInnerW)}) {
      const std::optional<at::Tensor> p = params.get(l * kNumParams + w);
      TORCH_CHECK(p && p->defined(), op, ": params[", l * kNumParams + w, "] is None (",
                  act == Act::kSwiGLU ? "swiglu needs the gate projection" : "a projection weight", ")");
    }
    inner = std::max(inner, params.get(l * kNumParams + kFfn + kInnerW)->size(0));
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
    const Layer<T> stages{op, io_params, 0, rms, float(eps)};
    T* hp = hidden.data_ptr<T>();
    if (io) {
      stages.linear(h.const_data_ptr<T>(), R, kInW, hp);
      if (const T* offset = stages.ptr(kInOffset))
        for (int64_t i = 0; i < R * D; ++i) hp[i] = T(float(hp[i]) + float(offset[i % D]));
    }
    for (int64_t l = 0; l < L; ++l)
      layer_decode<T>(hp, R, D, modulations.const_data_ptr<T>() + l * 9 * D,
                      Layer<T>{op, params, l * kNumParams, rms, float(eps)}, keys[l], values[l], length, row_ptr, num_cond,
                      uncond_cross.const_data_ptr<T>() + l * D, act, post_norms, qk_norm, scratch);
    if (io) {
      stages.norm(hp, nullptr, nullptr, nullptr, nullptr, kFinalNormW, R, D, scratch.y, scratch.zeros);
      stages.linear(scratch.y, R, kOutW, out.data_ptr<T>());
    }
  };
  dispatch_dtype(op, h.scalar_type(), run);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) { m.impl("denoiser_layers_decode", &denoiser_layers_decode_cpu); }

}  // namespace lcm_fast
