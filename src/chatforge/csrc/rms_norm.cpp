// RMSNorm of fp32 rows, y = x / sqrt(mean(x^2) + eps) * w, in one pass per row: the engine's eager
// steps call it ~60 times per token, where torch's CPU rms_norm runs as ~8 small ops (~30 us for
// one 576-wide row; benchmarks/README.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "simd.h"

namespace {

using chatforge_simd::Simd;

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
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * C;
      float* yr = yp + r * C;
      Simd::V acc = Simd::zero();
      int64_t i = 0;
      for (; i + Simd::kLanes <= C; i += Simd::kLanes) acc = Simd::fmadd(Simd::load(xr + i), Simd::load(xr + i), acc);
      float ss = Simd::sum(acc);
      for (; i < C; ++i) ss += xr[i] * xr[i];
      const float rstd = 1.f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(eps));
      const Simd::V rv = Simd::set1(rstd);
      for (i = 0; i + Simd::kLanes <= C; i += Simd::kLanes) Simd::store(yr + i, Simd::mul(Simd::mul(Simd::load(xr + i), rv), Simd::load(wp + i)));
      for (; i < C; ++i) yr[i] = xr[i] * rstd * wp[i];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) { m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor"); }
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) { m.impl("rms_norm", &rms_norm); }
