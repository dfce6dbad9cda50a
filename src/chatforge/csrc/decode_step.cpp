// One fp32 decode step of a Llama-block model on int4 or fp16 weight copies, every block in one call: the
// ops an eager step runs from Python (~15 per block, each a dispatch and a few allocations
// around a few microseconds of work) called here directly, in the same order on the same
// kernels, so the answers are the eager step's bit for bit.
//
// decode_layers(x (B, C) embeddings, w: per block kWeights tensors then the final norm's weight,
// k_cache and v_cache: per block (slots, Hkv, max_len, D), pos (B,) int64, cos and sin (B, 1, D)
// rows of the RoPE tables at pos, n_head, n_kv_head, eps) -> (B, C) final-norm hidden states.
// Row b is slot b: its new key and value go to position pos[b], and it attends to positions
// 0..pos[b] (all rows over the batch's longest span, the later positions masked, as the eager
// step does). A bias of no elements is no bias; fp16 weights come with scales of no elements.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "ops.h"

namespace {

// per block: norm1, qkv codes, qkv scales, qkv bias, out codes, out scales, norm2, gate|up codes,
// gate|up scales, down codes, down scales (codes: int4 in uint8 with their scales, or fp16 weights)
constexpr int64_t kWeights = 11;

at::Tensor with_bias(at::Tensor y, const at::Tensor& b) { return b.numel() ? y + b : y; }

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return w.scalar_type() == at::kHalf ? chatforge_native::f16_linear(x, w) : chatforge_native::q4_linear(x, w, scales);
}

at::Tensor decode_layers(const at::Tensor& x0, at::TensorList w, at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& pos,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t n_head, int64_t n_kv_head, double eps) {
  const int64_t L = static_cast<int64_t>(k_cache.size()), H = n_head, Hkv = n_kv_head;
  TORCH_CHECK(x0.dim() == 2 && x0.scalar_type() == at::kFloat, "decode_layers: x must be (B, C) fp32");
  TORCH_CHECK(static_cast<int64_t>(w.size()) == L * kWeights + 1 && static_cast<int64_t>(v_cache.size()) == L,
              "decode_layers: ", kWeights, " weights per block and a final norm expected for ", L, " blocks, got ", w.size());
  const int64_t B = x0.size(0);
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong, "decode_layers: pos must be (B,) int64");
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "decode_layers: n_head ", H, " is not a multiple of n_kv_head ", Hkv);
  const at::Tensor p = pos.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t lo = *std::min_element(pp, pp + B), hi = *std::max_element(pp, pp + B), S = hi + 1;
  for (int64_t l = 0; l < L; ++l)
    TORCH_CHECK(k_cache[l].dim() == 4 && k_cache[l].size(0) >= B && k_cache[l].size(1) == Hkv && k_cache[l].size(2) > hi &&
                    k_cache[l].sizes() == v_cache[l].sizes() && k_cache[l].scalar_type() == at::kFloat &&
                    v_cache[l].scalar_type() == at::kFloat,
                "decode_layers: block ", l, "'s cache ", k_cache[l].sizes(), " does not hold ", B, " rows of ", Hkv,
                " heads up to position ", hi);
  const int64_t D = k_cache.empty() ? 0 : k_cache[0].size(3);
  // rows at different positions: row b may attend to s <= pos[b] (the eager step's mask)
  std::optional<at::Tensor> mask;
  if (lo != hi) {
    at::Tensor m = at::empty({B, S}, x0.options().dtype(at::kBool));
    bool* mp = m.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) mp[b * S + s] = s <= pp[b];
    mask = m;
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  at::Tensor x = x0.contiguous();
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* lw = w.data() + l * kWeights;
    const at::Tensor qkv = with_bias(linear(chatforge_native::rms_norm(x, lw[0], eps), lw[1], lw[2]), lw[3]);
    TORCH_CHECK(qkv.size(1) == (H + 2 * Hkv) * D, "decode_layers: block ", l, "'s q|k|v projection has ", qkv.size(1),
                " outputs, not ", (H + 2 * Hkv) * D);
    // query and key heads rotated together, as model.Attention does
    const at::Tensor qk = chatforge_native::rope(qkv.view({B, 1, H + 2 * Hkv, D}).narrow(2, 0, H + Hkv).transpose(1, 2), cos, sin);
    const at::Tensor k_new = qk.narrow(1, H, Hkv).select(2, 0);                       // (B, Hkv, D)
    const at::Tensor v_new = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({B, Hkv, D});
    for (int64_t b = 0; b < B; ++b) {
      k_cache[l].select(0, b).select(1, pp[b]).copy_(k_new.select(0, b));
      v_cache[l].select(0, b).select(1, pp[b]).copy_(v_new.select(0, b));
    }
    const at::Tensor y = chatforge_native::decode_attention(qk.narrow(1, 0, H).reshape({B, H, D}), k_cache[l].narrow(0, 0, B).narrow(2, 0, S),
                                                            v_cache[l].narrow(0, 0, B).narrow(2, 0, S), mask, scale);
    x = x + linear(y.view({B, H * D}), lw[4], lw[5]);
    const at::Tensor h = chatforge_native::swiglu(linear(chatforge_native::rms_norm(x, lw[6], eps), lw[7], lw[8]));
    x = x + linear(h, lw[9], lw[10]);
  }
  return chatforge_native::rms_norm(x, w[L * kWeights], eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) {
  m.def("decode_layers(Tensor x, Tensor[] w, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor pos, Tensor cos, Tensor sin, "
        "int n_head, int n_kv_head, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) { m.impl("decode_layers", &decode_layers); }
