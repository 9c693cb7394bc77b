// CPU decoder_layers_decode: the causal decoder layers (Base-LCM) for one new position per document, the
// specification being decoder_layers_decode_ref in python/lcm_fast/ops/decoder.py. The fast engine calls it
// once per generated sentence: the layers run back to back on one scratch buffer, every projection through
// the skinny-linear kernel, each layer's new key and value written into its cache in place.
#include <torch/library.h>

#include "decode/layer_decode.h"

namespace lcm_fast {
namespace {

using namespace decode;

// Entries of one layer's `params`, in the order of DECODER_LAYER_TENSORS (python/lcm_fast/ops/decoder.py).
enum Param : int {
  kSaNormW, kSaNormB, kQW, kQB, kKW, kKB, kVW, kVB, kQNormW, kQNormB, kKNormW, kKNormB, kOutW, kOutB,
  kSaPostNormW, kSaPostNormB
};
constexpr int kFfn = kSaPostNormB + 1;  // the FfnParam entries (layer_decode.h) from here
constexpr int kNumParams = kFfn + kNumFfnParams;

// x [rows, H * hd] rotated in place by RoPE over interleaved pairs, cis [hd / 2, 2] the (cos, sin) of each pair at
// the position (fp32 maths, rounded to T as the module's rotation is).
template <typename T>
void rotate(T* x, int64_t rows, int64_t hd, const float* cis) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < hd / 2; ++j) {
      T* pair = x + i * hd + 2 * j;
      const float even = float(pair[0]), odd = float(pair[1]), cos = cis[2 * j], sin = cis[2 * j + 1];
      pair[0] = T(even * cos - odd * sin);
      pair[1] = T(even * sin + odd * cos);
    }
}

// One layer, in place on h [R, D]; keys/values [B, H, capacity, hd] its cache, `length` positions filled; rows
// r < C write into and attend over batch row rows[r] (or r), the others attend to themselves only.
template <typename T>
void layer_decode(T* h, int64_t R, int64_t D, const Layer<T>& layer, const at::Tensor& keys, const at::Tensor& values,
                  int64_t length, const int64_t* rows, int64_t C, const float* cis, Act act,
                  bool post_norms, bool qk_norm, const Scratch<T>& s, const T* ones) {
  const int64_t H = keys.size(1), capacity = keys.size(2), hd = keys.size(3);
  T *y = s.y, *a = s.a, *q = s.q, *k = s.k, *v = s.v, *o = s.o;
  const T* zeros = s.zeros;

  layer.norm(h, nullptr, nullptr, nullptr, nullptr, kSaNormW, R, D, y, zeros);
  layer.linear(y, R, kQW, q);
  layer.linear(y, R, kKW, k);
  layer.linear(y, R, kVW, v);
  if (qk_norm) {
    layer.norm(q, nullptr, nullptr, nullptr, nullptr, kQNormW, R, D, q, zeros);
    layer.norm(k, nullptr, nullptr, nullptr, nullptr, kKNormW, R, D, k, zeros);
  }
  if (cis) {
    rotate(q, R * H, hd, cis);
    rotate(k, R * H, hd, cis);
  }
  T *kc = keys.data_ptr<T>(), *vc = values.data_ptr<T>();
  for (int64_t r = 0; r < C; ++r)
    for (int64_t head = 0; head < H; ++head) {
      const int64_t b = rows ? rows[r] : r;
      const int64_t at = ((b * H + head) * capacity + length) * hd, from = r * D + head * hd;
      std::copy(k + from, k + from + hd, kc + at);
      std::copy(v + from, v + from + hd, vc + at);
    }
  attend<T>(q, C, kc, vc, rows, H, capacity, hd, length + 1, o);
  std::copy(v + C * D, v + R * D, o + C * D);  // the softmax over a row's own key alone is 1
  layer.linear(o, R, kOutW, a);
  if (post_norms) {
    layer.norm(a, nullptr, nullptr, nullptr, nullptr, kSaPostNormW, R, D, a, zeros);
  }
  layer.norm(h, a, ones, nullptr, nullptr, kFfn + kFfNormW, R, D, y, zeros);  // h += a; y = norm_ff(h)
  ffn_decode<T>(h, y, R, D, layer.block(kFfn), act, post_norms, nullptr, s.g, s.u, s.f, zeros);
}

at::Tensor decoder_layers_decode_cpu(const at::Tensor& h, const c10::List<std::optional<at::Tensor>>& params,
                                     at::TensorList keys, at::TensorList values, int64_t length,
                                     const std::optional<at::Tensor>& rows, int64_t num_cond,
                                     const std::optional<at::Tensor>& rope, bool rms, double eps,
                                     c10::string_view activation, bool post_norms, bool qk_norm,
                                     const c10::List<std::optional<at::Tensor>>& final_norm) {
  const char* op = "decoder_layers_decode";
  const int64_t L = int64_t(keys.size());
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), op, ": h must be a contiguous [R, D] tensor, got ", h.sizes());
  const int64_t R = h.size(0), D = h.size(1);
  check_caches(op, keys, values, D, h.scalar_type());
  TORCH_CHECK(int64_t(params.size()) == L * kNumParams, op, ": params needs ", kNumParams, " entries per layer (",
              L * kNumParams, "), got ", params.size());
  TORCH_CHECK(0 <= num_cond && num_cond <= R, op, ": num_cond ", num_cond, " outside [0, ", R, "]");
  TORCH_CHECK(0 <= length && length < keys[0].size(2), op, ": length ", length, " outside [0, ", keys[0].size(2),
              "): the caches need room for the new position");
  const int64_t batch = keys[0].size(0), hd = keys[0].size(3);
  at::Tensor row_index;
  if (rows) {
    row_index = rows->scalar_type() == at::kLong && rows->is_contiguous() ? *rows : rows->to(at::kLong).contiguous();
    TORCH_CHECK(row_index.numel() == num_cond, op, ": rows must have num_cond = ", num_cond, " entries");
    const int64_t* index = row_index.const_data_ptr<int64_t>();
    std::vector<bool> taken(batch, false);
    for (int64_t r = 0; r < num_cond; ++r) {
      TORCH_CHECK(0 <= index[r] && index[r] < batch, op, ": rows[", r, "] = ", index[r],
                  " is not a batch row of the cache (", batch, ")");
      TORCH_CHECK(!taken[index[r]], op, ": rows[", r, "] = ", index[r], " twice: each row writes its batch row");
      taken[index[r]] = true;
    }
  } else {
    TORCH_CHECK(num_cond <= batch, op, ": ", num_cond, " conditional rows but the cache has ", batch);
  }
  if (rope) {
    TORCH_CHECK(rope->dim() == 3 && 2 * rope->size(1) == hd && rope->size(2) == 2 && rope->is_contiguous() &&
                    rope->scalar_type() == at::kFloat,
                op, ": rope must be a contiguous fp32 [positions, ", hd / 2, ", 2], got ", rope->sizes());
    TORCH_CHECK(length < rope->size(0), op, ": position ", length, " has no RoPE entry (", rope->size(0), " positions)");
  }
  TORCH_CHECK(final_norm.empty() || final_norm.size() == 2, op, ": final_norm must be empty or [weight, bias], got ",
              final_norm.size(), " entries");
  check_params(op, "final_norm", final_norm, h);
  const Act act = parse_activation(op, std::string_view(activation.data(), activation.size()));
  check_params(op, "params", params, h);
  int64_t inner = 0;
  for (int64_t l = 0; l < L; ++l) {
    for (int w : {int(kQW), int(kKW), int(kVW), int(kOutW), kFfn + kInnerW, kFfn + kFfOutW,
                  kFfn + (act == Act::kSwiGLU ? kGateW : kInnerW), kFfn + (act == Act::kPReLU ? kActW : kInnerW)}) {
      const std::optional<at::Tensor> p = params.get(l * kNumParams + w);
      TORCH_CHECK(p && p->defined(), op, ": params[", l * kNumParams + w, "] is None (",
                  act == Act::kSwiGLU ? "swiglu needs the gate projection" : "a projection weight", ")");
    }
    inner = std::max(inner, params.get(l * kNumParams + kFfn + kInnerW)->size(0));
  }
  const float* cis = rope ? rope->const_data_ptr<float>() + length * hd : nullptr;
  at::Tensor hidden = h.clone();
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const Scratch<T> scratch(R, D, inner, h.options());
    const std::vector<T> ones(D, T(1.f));
    const int64_t* row_ptr = rows ? row_index.const_data_ptr<int64_t>() : nullptr;
    for (int64_t l = 0; l < L; ++l)
      layer_decode<T>(hidden.data_ptr<T>(), R, D, Layer<T>{op, params, l * kNumParams, rms, float(eps)}, keys[l],
                      values[l], length, row_ptr, num_cond, cis, act, post_norms, qk_norm, scratch, ones.data());
    if (!final_norm.empty())
      Layer<T>{op, final_norm, 0, rms, float(eps)}.norm(hidden.data_ptr<T>(), nullptr, nullptr, nullptr, nullptr, 0, R,
                                                        D, hidden.data_ptr<T>(), scratch.zeros);
  };
  dispatch_dtype(op, h.scalar_type(), run);
  return hidden;
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) { m.impl("decoder_layers_decode", &decoder_layers_decode_cpu); }

}  // namespace lcm_fast
