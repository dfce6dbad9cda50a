// The project's CPU ops as C++ functions (each file registers its own with torch), so that
// decode_step.cpp can run a whole step on them without a dispatch per op.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace chatforge_native {

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales_mins);
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales);
at::Tensor f16_linear(const at::Tensor& x, const at::Tensor& w);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor swiglu(const at::Tensor& h);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            double scale);

}  // namespace chatforge_native
