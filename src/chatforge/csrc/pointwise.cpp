// The small row-wise ops of an eager fp32 decode step, each one pass where torch runs several
// small ops (each a dispatch, an allocation and a parallel region: ~4 us apiece for a 576-wide row,
// benchmarks/README.md), ~150 of them per token:
// - rms_norm: y = x / sqrt(mean(x^2) + eps) * w per row (torch's CPU norm is ~8 ops);
// - rope: x * cos + [-x2, x1] * sin (model.apply_rope: flip, cat, 2 multiplies, an add);
// - swiglu: silu(gate) * up of [gate | up] rows (model.MLP: chunk, silu, multiply).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace chatforge_native {

using chatforge_simd::Simd;

void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t C, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    const float rstd = 1.f / std::sqrt(chatforge_simd::dot(xr, xr, C) / static_cast<float>(C) + eps);
    const Simd::V rv = Simd::set1(rstd);
    int64_t i = 0;
    for (; i + Simd::kLanes <= C; i += Simd::kLanes) Simd::store(yr + i, Simd::mul(Simd::mul(Simd::load(xr + i), rv), Simd::load(w + i)));
    for (; i < C; ++i) yr[i] = xr[i] * rstd * w[i];
  }
}

void rope_row(const float* x, const float* c, const float* s, float* y, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    y[i] = x[i] * c[i] - x[i + half] * s[i];
    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
  }
}

void swiglu_rows(const float* h, float* y, int64_t rows, int64_t F) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = h + r * 2 * F;
    const float* u = g + F;
    float* yr = y + r * F;
    int64_t i = 0;
    for (; i + Simd::kLanes <= F; i += Simd::kLanes) {
      const Simd::V gv = Simd::load(g + i);
      // exp(-g) for -g up to 88 (beyond, fp32's exp overflows; silu is ~0 there anyway)
      const Simd::V e = Simd::exp(Simd::min(Simd::mul(gv, Simd::set1(-1.f)), Simd::set1(88.f)));
      Simd::store(yr + i, Simd::mul(Simd::div(gv, Simd::add(Simd::set1(1.f), e)), Simd::load(u + i)));
    }
    for (; i < F; ++i) yr[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: fp32 x and weight only");
  const int64_t C = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == C, "rms_norm: weight of ", C, " elements expected, got ", w.sizes());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = C ? xc.numel() / C : 0;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows of a few thousand floats: one thread unless there are many (a prefill)
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    rms_norm_rows(xp + r0 * C, wp, yp + r0 * C, r1 - r0, C, static_cast<float>(eps));
  });
  return y;
}

// x (B, N, T, D) with a contiguous last dimension, cos and sin (B or 1, T, D) -> contiguous (B, N, T, D)
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1, "rope: fp32 x (B, N, T, D), contiguous along D");
  const int64_t B = x.size(0), N = x.size(1), T = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0 && cos.sizes() == sin.sizes() && cos.dim() == 3 && (cos.size(0) == B || cos.size(0) == 1) &&
              cos.size(1) == T && cos.size(2) == D && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "rope: cos and sin must be fp32 (B or 1, T, D) for x ", x.sizes());
  const at::Tensor c = cos.contiguous(), s = sin.contiguous();
  at::Tensor y = at::empty({B, N, T, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t cb = c.size(0) == 1 ? 0 : T * D;
  at::parallel_for(0, B * N * T, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / (N * T), n = (r / T) % N, t = r % T;
      const float* xr = xp + b * x.stride(0) + n * x.stride(1) + t * x.stride(2);
      const float* cr = cp + b * cb + t * D;
      const float* sr = sp + b * cb + t * D;
      rope_row(xr, cr, sr, yp + r * D, D);
    }
  });
  return y;
}

// h (..., 2F) with a contiguous last dimension -> (..., F): silu(h[..., :F]) * h[..., F:]
at::Tensor swiglu(const at::Tensor& h) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() >= 1 && h.size(-1) % 2 == 0, "swiglu: fp32 (..., 2F) rows");
  const at::Tensor hc = h.contiguous();
  const int64_t F = hc.size(-1) / 2, rows = F ? hc.numel() / (2 * F) : 0;
  std::vector<int64_t> shape(hc.sizes().begin(), hc.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, hc.options());
  const float* hp = hc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)),
                   [&](int64_t r0, int64_t r1) { swiglu_rows(hp + r0 * 2 * F, yp + r0 * F, r1 - r0, F); });
  return y;
}

}  // namespace chatforge_native

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) {
  m.impl("rms_norm", &chatforge_native::rms_norm);
  m.impl("rope", &chatforge_native::rope);
  m.impl("swiglu", &chatforge_native::swiglu);
}
