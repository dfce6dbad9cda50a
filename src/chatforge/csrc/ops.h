// The project's CPU kernels as C++ functions for decode_step.cpp, which runs a whole step on
// them without a dispatch per op (each file registers its tensor ops with torch itself).
#pragma once

#include <ATen/ATen.h>

namespace chatforge_native {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);

// The kernels on raw rows, for decode_step.cpp's buffers (their callers check the shapes).
// block_linear_into: y (M, N) = x (M, K) @ W.T on a block's int4 codes with their scales, or on
// fp16 weights (scales unused); check_block_linear checks such weights for K inputs, N outputs.
void check_block_linear(const char* name, int64_t K, int64_t N, const at::Tensor& w, const at::Tensor& scales);
void block_linear_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scales, float* y);
void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t C, float eps);
void rope_row(const float* x, const float* cos, const float* sin, float* y, int64_t D);
void swiglu_rows(const float* h, float* y, int64_t rows, int64_t F);
struct CacheView {  // keys or values (B, Hkv, S, D), contiguous along D: the first three strides
  const void* data;
  int64_t row, head, pos;
  bool fp16 = false;  // c10::Half elements (a decode cache kept in half the bytes), else float
};
CacheView cache_view(const at::Tensor& t);  // of a (B, Hkv, S, D) fp32 or fp16 tensor
// out (B, H, D) contiguous; mask (B, S) or null
void decode_attention_into(const float* q, const CacheView& k, const CacheView& v, const bool* mask, int64_t B, int64_t H,
                           int64_t Hkv, int64_t S, int64_t D, float scale, float* out);

}  // namespace chatforge_native
