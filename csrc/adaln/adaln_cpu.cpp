// CPU implementation of the AdaLN ops: rows in parallel (at::parallel_for), each row in fp32 scratch
// with vectorised passes (at::vec, AVX2/FMA): statistics (two-pass moments), then the fused output.
// The backward accumulates weight/bias gradients per thread and sums them at the end.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "adaln/adaln.h"
#include "adaln/adaln_host.h"

namespace lcm_fast {
namespace {

using Vec = at::vec::Vectorized<float>;

inline Vec load(const float* p, int64_t n) { return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n); }

inline float sum(const float* a, int64_t D) {
  return at::vec::reduce_all<float>([](Vec x, Vec y) { return x + y; }, a, D);
}

// (mean, rstd) of a row: LayerNorm uses two-pass moments (not E[x^2] - E[x]^2); RMSNorm mean = 0.
inline std::pair<float, float> row_stats(const float* r, int64_t D, bool rms, float eps, float* scratch) {
  const float mean = rms ? 0.f : sum(r, D) / D;
  at::vec::map([mean](Vec v) { return (v - Vec(mean)) * (v - Vec(mean)); }, scratch, r, D);
  return {mean, 1.f / std::sqrt(sum(scratch, D) / D + eps)};
}

// This thread's fp32 scratch of at least n floats, kept between calls: the fast engine normalises a few
// rows ~80 times per denoising step, where allocating and zeroing a fresh buffer per call cost more than
// the normalisation itself.
inline float* row_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (int64_t(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Converts n elements of T to fp32 (a no-op view for float).
template <typename T>
inline const float* as_float(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    at::vec::convert(src, dst, n);
    return dst;
  }
}

template <typename T>
void forward_rows(const T* x, const T* residual, const T* branch, const T* gate, const T* shift, const T* scale,
                  int64_t mod_stride, const float* weight, const float* bias, T* residual_out, T* y, int64_t rows, int64_t D, bool rms,
                  float eps) {
  const bool gated = residual != nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    float* f = row_scratch(7 * D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * D, m = row * mod_stride;
      const float* r;
      if (gated) {  // r = residual + gate * branch
        const float* res = as_float(residual + o, f, D);
        const float* br = as_float(branch + o, f + D, D);
        const float* g = as_float(gate + m, f + 2 * D, D);
        at::vec::map3([](Vec a, Vec b, Vec c) { return a + c * b; }, f + 3 * D, res, br, g, D);
        r = f + 3 * D;
        at::vec::convert(r, residual_out + o, D);
      } else {
        r = as_float(x + o, f + 3 * D, D);
      }
      const auto [mean, rstd] = row_stats(r, D, rms, eps, f + 6 * D);
      const float* sc = as_float(scale + m, f, D);
      const float* sh = as_float(shift + m, f + D, D);
      float* out = f + 2 * D;
      for (int64_t i = 0; i < D; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), D - i);
        Vec v = (load(r + i, n) - Vec(mean)) * Vec(rstd);
        if (weight != nullptr) v = v * load(weight + i, n);
        if (bias != nullptr) v = v + load(bias + i, n);
        (v * (Vec(1.f) + load(sc + i, n)) + load(sh + i, n)).store(out + i, n);
      }
      at::vec::convert(out, y + o, D);
    }
  });
}

template <typename T>
void backward_rows(const T* grad_y, const T* x, const T* scale, const float* weight, const float* bias, T* grad_x,
                   T* grad_scale, float* grad_weight, float* grad_bias, int64_t rows, int64_t D, bool rms, float eps) {
  const int threads = at::get_num_threads();
  std::vector<float> partial(2 * threads * D, 0.f);  // per-thread [grad_weight | grad_bias]
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / D), [&](int64_t begin, int64_t end) {
    float* gw = partial.data() + 2 * at::get_thread_num() * D;
    float* gb = gw + D;
    std::vector<float> buf(8 * D);
    float* f = buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row * D;
      const float* xr = as_float(x + o, f, D);
      const auto [mean, rstd] = row_stats(xr, D, rms, eps, f + 7 * D);
      const float* dy = as_float(grad_y + o, f + D, D);
      const float* sc = as_float(scale + o, f + 2 * D, D);
      float *xhat = f + 3 * D, *dxhat = f + 4 * D, *dsc = f + 5 * D, *dx = f + 6 * D;
      Vec c1(0.f), c2(0.f);  // sums of dxhat and dxhat * xhat
      for (int64_t i = 0; i < D; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), D - i);
        const Vec xh = (load(xr + i, n) - Vec(mean)) * Vec(rstd);
        const Vec w = weight != nullptr ? load(weight + i, n) : Vec(1.f);
        Vec normed = xh * w;
        if (bias != nullptr) normed = normed + load(bias + i, n);
        const Vec g = load(dy + i, n);
        const Vec dn = g * (Vec(1.f) + load(sc + i, n));  // d loss / d norm(x)
        (g * normed).store(dsc + i, n);
        (load(gw + i, n) + dn * xh).store(gw + i, n);
        (load(gb + i, n) + dn).store(gb + i, n);
        const Vec dxh = dn * w;
        xh.store(xhat + i, n);
        dxh.store(dxhat + i, n);
        c1 = c1 + dxh;  // tail lanes are zero (loads zero-fill)
        c2 = c2 + dxh * xh;
      }
      const auto add = [](Vec a, Vec b) { return a + b; };
      const float m1 = rms ? 0.f : at::vec::vec_reduce_all<float>(add, c1) / D;
      const float m2 = at::vec::vec_reduce_all<float>(add, c2) / D;
      at::vec::map2([=](Vec dxh, Vec xh) { return Vec(rstd) * (dxh - Vec(m1) - xh * Vec(m2)); }, dx, dxhat, xhat, D);
      at::vec::convert(dx, grad_x + o, D);
      at::vec::convert(static_cast<const float*>(dsc), grad_scale + o, D);
    }
  });
  for (int t = 0; t < threads; ++t) {
    const float* gw = partial.data() + 2 * t * D;
    at::vec::map2([](Vec a, Vec b) { return a + b; }, grad_weight, grad_weight, gw, D);
    at::vec::map2([](Vec a, Vec b) { return a + b; }, grad_bias, grad_bias, gw + D, D);
  }
}

template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
    case DType::kFloat16: f(c10::Half{}); break;
  }
}

void cpu_backward(const void* grad_y, const void* x, const void* scale, const float* weight, const float* bias,
                  void* grad_x, void* grad_scale, float* grad_weight, float* grad_bias, int64_t rows, int64_t dim,
                  bool rms, float eps, DType dtype, void* /*stream*/) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    backward_rows<T>(static_cast<const T*>(grad_y), static_cast<const T*>(x), static_cast<const T*>(scale), weight,
                     bias, static_cast<T*>(grad_x), static_cast<T*>(grad_scale), grad_weight, grad_bias, rows, dim,
                     rms, eps);
  });
}

at::Tensor norm_modulate_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool rms,
                             double eps) {
  return adaln_norm_modulate_host(adaln_forward_cpu, x, shift, scale, weight, bias, rms, eps, nullptr);
}

std::tuple<at::Tensor, at::Tensor> gated_residual_norm_modulate_cpu(
    const at::Tensor& residual, const at::Tensor& branch, const at::Tensor& gate, const at::Tensor& shift,
    const at::Tensor& scale, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, bool rms,
    double eps) {
  return adaln_gated_residual_norm_modulate_host(adaln_forward_cpu, residual, branch, gate, shift, scale, weight, bias,
                                                 rms, eps, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_modulate_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& scale, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool rms, double eps) {
  return adaln_norm_modulate_backward_host(cpu_backward, grad_y, x, scale, weight, bias, rms, eps, nullptr);
}

}  // namespace

void adaln_forward_cpu(const void* x, const void* residual, const void* branch, const void* gate, const void* shift,
                       const void* scale, int64_t mod_stride, const float* weight, const float* bias,
                       void* residual_out, void* y, int64_t rows, int64_t dim, bool rms, float eps, DType dtype,
                       void* /*stream*/) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_rows<T>(static_cast<const T*>(x), static_cast<const T*>(residual), static_cast<const T*>(branch),
                    static_cast<const T*>(gate), static_cast<const T*>(shift), static_cast<const T*>(scale), mod_stride,
                    weight, bias, static_cast<T*>(residual_out), static_cast<T*>(y), rows, dim, rms, eps);
  });
}

TORCH_LIBRARY_IMPL(lcm_fast, CPU, m) {
  m.impl("adaln_norm_modulate", &norm_modulate_cpu);
  m.impl("adaln_gated_residual_norm_modulate", &gated_residual_norm_modulate_cpu);
  m.impl("adaln_norm_modulate_backward", &norm_modulate_backward_cpu);
}

}  // namespace lcm_fast
