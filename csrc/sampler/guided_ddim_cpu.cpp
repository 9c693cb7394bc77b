// CPU implementation of lcm_fast::guided_ddim_step_: rows in parallel (at::parallel_for), each row in
// three vectorised passes (AVX2/FMA via at::vec) over fp32 scratch: (1) epsilon of both halves and the
// CFG combination with running sums, (2) squared deviations for the rescale ratio (two-pass moments,
// not E[x^2] - E[x]^2), (3) x0, epsilon scaling, clips and the DDIM update.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "sampler/guided_ddim.h"
#include "sampler/sampler_checks.h"

namespace lcm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

struct RowArgs {
  const float* x;      // [D] current latent
  const float* cond;   // [D] model output, conditional (or only) half
  const float* uncond; // [D] unconditional half (CFG) or nullptr
  const float* noise;  // [D] or nullptr
  float* x_prev;       // [D] out
  float* x0;           // [D] out
  float* eps_c;        // [D] scratch
  float* guided;       // [D] scratch
};

// eps implied by a model output under the prediction type (official get_epsilon).
template <int PT>
inline Vec to_eps(Vec out, Vec x, Vec sa, Vec sb) {
  if constexpr (PT == kSample) return (x - sa * out) / sb;
  else if constexpr (PT == kEpsilon) return out;
  else return sa * out + sb * x;
}

// (x0, eps) from a model output (official DDIMScheduler.step, step 3).
template <int PT>
inline void split(Vec out, Vec x, Vec sa, Vec sb, Vec& x0, Vec& eps) {
  if constexpr (PT == kSample) {
    x0 = out;
    eps = (x - sa * out) / sb;
  } else if constexpr (PT == kEpsilon) {
    x0 = (x - sb * out) / sa;
    eps = out;
  } else {
    x0 = sa * x - sb * out;
    eps = sa * out + sb * x;
  }
}

// Loads n <= Vec::size() floats (the row tail) with zero fill.
inline Vec load(const float* p, int64_t n) { return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n); }

template <int PT>
void guided_row(const RowArgs& r, int64_t D, const float* coef, const float* params, bool guided_step) {
  const Vec sa(coef[kSqrtAlpha]), sb(coef[kSqrtBeta]), sap(coef[kSqrtAlphaPrev]), dir(coef[kDirection]);
  const Vec sigma(coef[kSigma]), scaling(params[kEpsilonScaling]);
  const Vec clip_n(params[kClipNoise]), clip_s(params[kClipSample]);
  Vec factor(1.f);
  if (guided_step) {
    // pass 1: eps of both halves, g = eps_u + w (eps_c - eps_u), running sums for the means
    const Vec w(params[kGuidanceScale]);
    Vec sum_c(0.f), sum_g(0.f);
    for (int64_t i = 0; i < D; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), D - i);
      const Vec x = load(r.x + i, n);
      const Vec ec = to_eps<PT>(load(r.cond + i, n), x, sa, sb);
      const Vec eu = to_eps<PT>(load(r.uncond + i, n), x, sa, sb);
      const Vec g = eu + w * (ec - eu);
      ec.store(r.eps_c + i, n);
      g.store(r.guided + i, n);
      // the zero-filled tail lanes add 0 to the sums
      sum_c = sum_c + (n == Vec::size() ? ec : Vec::set(Vec(0.f), ec, n));
      sum_g = sum_g + (n == Vec::size() ? g : Vec::set(Vec(0.f), g, n));
    }
    const float mean_c = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, sum_c) / D;
    const float mean_g = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, sum_g) / D;
    // pass 2: squared deviations; std(eps_c) / std(g) does not depend on Bessel's correction
    Vec ss_c(0.f), ss_g(0.f);
    for (int64_t i = 0; i < D; i += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), D - i);
      const Vec dc = load(r.eps_c + i, n) - Vec(mean_c);
      const Vec dg = load(r.guided + i, n) - Vec(mean_g);
      ss_c = ss_c + (n == Vec::size() ? dc * dc : Vec::set(Vec(0.f), dc * dc, n));
      ss_g = ss_g + (n == Vec::size() ? dg * dg : Vec::set(Vec(0.f), dg * dg, n));
    }
    const float var_c = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, ss_c);
    const float var_g = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, ss_g);
    factor = Vec(params[kRescale] * (std::sqrt(var_c) / std::sqrt(var_g)) + params[kOneMinusRescale]);
  }
  // pass 3: x0, epsilon scaling (after x0, as the official step), clips, DDIM update (Eq. 12)
  for (int64_t i = 0; i < D; i += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), D - i);
    const Vec x = load(r.x + i, n);
    Vec x0, eps;
    if (guided_step) {
      eps = factor * load(r.guided + i, n);
      x0 = (x - sb * eps) / sa;
    } else {
      split<PT>(load(r.cond + i, n), x, sa, sb, x0, eps);
    }
    eps = eps / scaling;
    x0 = at::vec::clamp(x0, Vec(0.f) - clip_s, clip_s);
    Vec prev = sap * x0 + dir * eps;
    if (r.noise != nullptr) prev = prev + sigma * load(r.noise + i, n);
    prev = at::vec::clamp(prev, Vec(0.f) - clip_n, clip_n);
    prev.store(r.x_prev + i, n);
    x0.store(r.x0 + i, n);
  }
}

template <typename T>
void guided_ddim_step_impl(const at::Tensor& latents, const at::Tensor& pred_x0, const at::Tensor& model_out,
                           const float* coef, const float* params, const T* noise, bool cfg, int64_t pt) {
  const int64_t B = latents.size(0), D = latents.size(1);
  T* lat = latents.data_ptr<T>();
  T* x0_out = pred_x0.data_ptr<T>();
  const T* out = model_out.const_data_ptr<T>();
  const bool guided_step = cfg && coef[kFirstStep] == 0.f;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    // fp32 scratch: inputs converted once (for half types), outputs, and the two pass-1 buffers
    std::vector<float> buf(8 * D);
    float* f = buf.data();
    for (int64_t b = begin; b < end; ++b) {
      RowArgs r{};
      auto in = [&](const T* src, int slot) -> const float* {
        if constexpr (std::is_same_v<T, float>) return src;
        at::vec::convert(src, f + slot * D, D);
        return f + slot * D;
      };
      r.x = in(lat + b * D, 0);
      r.cond = in(out + b * D, 1);
      r.uncond = cfg ? in(out + (B + b) * D, 2) : nullptr;
      r.noise = noise != nullptr ? in(noise + b * D, 3) : nullptr;
      r.x_prev = f + 4 * D;
      r.x0 = f + 5 * D;
      r.eps_c = f + 6 * D;
      r.guided = f + 7 * D;
      switch (pt) {
        case kSample: guided_row<kSample>(r, D, coef, params, guided_step); break;
        case kEpsilon: guided_row<kEpsilon>(r, D, coef, params, guided_step); break;
        default: guided_row<kVPrediction>(r, D, coef, params, guided_step); break;
      }
      at::vec::convert(r.x_prev, lat + b * D, D);
      at::vec::convert(r.x0, x0_out + b * D, D);
    }
  });
}

void guided_ddim_step_cpu(at::Tensor& latents, at::Tensor& pred_x0, const at::Tensor& model_out,
                          const at::Tensor& coef, const at::Tensor& params, const std::optional<at::Tensor>& noise,
                          int64_t prediction_type) {
  const bool cfg = check_guided_ddim_args(latents, pred_x0, model_out, coef, params, noise, prediction_type);
  // coef/params may live on any device for the CPU kernel only if they are CPU tensors
  TORCH_CHECK(coef.is_cpu() && params.is_cpu(), "guided_ddim_step_: coef and params must be CPU tensors for CPU inputs");
  const float* c = coef.const_data_ptr<float>();
  const float* p = params.const_data_ptr<float>();
  switch (latents.scalar_type()) {
    case at::kFloat:
      guided_ddim_step_impl<float>(latents, pred_x0, model_out, c, p,
                                   noise ? noise->const_data_ptr<float>() : nullptr, cfg, prediction_type);
      break;
    case at::kBFloat16:
      guided_ddim_step_impl<c10::BFloat16>(latents, pred_x0, model_out, c, p,
                                           noise ? noise->const_data_ptr<c10::BFloat16>() : nullptr, cfg, prediction_type);
      break;
    case at::kHalf:
      guided_ddim_step_impl<c10::Half>(latents, pred_x0, model_out, c, p,
                                       noise ? noise->const_data_ptr<c10::Half>() : nullptr, cfg, prediction_type);
      break;
    default:
      TORCH_CHECK(false, "guided_ddim_step_: unsupported dtype ", latents.scalar_type(), " (float32, bfloat16, float16)");
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) { m.impl("guided_ddim_step_", &guided_ddim_step_cpu); }

}  // namespace lcm_fast
