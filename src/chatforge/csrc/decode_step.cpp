// One fp32 decode step of a Llama-block model on int4 or fp16 weight copies, every block in one call: the
// ops an eager step runs from Python (~15 per block, each a dispatch and a few allocations
// around a few microseconds of work) run here on raw rows in buffers that every block reuses (no
// dispatch, view or allocation per op), in the same order on the same kernels, so the answers are
// the eager step's bit for bit.
//
// decode_layers(x (B, C) embeddings, w: per block kWeights tensors then the final norm's weight,
// k_cache and v_cache: per block (slots, Hkv, max_len, D), fp32 or fp16 (new keys and values
// rounded to nearest, held to fp16's largest finite value), pos (B,) int64, cos and sin (B, 1, D)
// rows of the RoPE tables at pos, n_head, n_kv_head, eps) -> (B, C) final-norm hidden states.
// Row b is slot b: its new key and value go to position pos[b], and it attends to positions
// 0..pos[b] (all rows over the batch's longest span, the later positions masked, as the eager
// step does). A bias of no elements is no bias; fp16 weights come with scales of no elements.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"

namespace {

// per block: norm1, qkv codes, qkv scales, qkv bias, out codes, out scales, norm2, gate|up codes,
// gate|up scales, down codes, down scales (codes: int4 in uint8 with their scales, or fp16 weights)
constexpr int64_t kWeights = 11;

at::Tensor decode_layers(const at::Tensor& x0, at::TensorList w, at::TensorList k_cache, at::TensorList v_cache, const at::Tensor& pos,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t n_head, int64_t n_kv_head, double eps) {
  const int64_t L = static_cast<int64_t>(k_cache.size()), H = n_head, Hkv = n_kv_head;
  TORCH_CHECK(x0.dim() == 2 && x0.scalar_type() == at::kFloat, "decode_layers: x must be (B, C) fp32");
  TORCH_CHECK(static_cast<int64_t>(w.size()) == L * kWeights + 1 && static_cast<int64_t>(v_cache.size()) == L && L > 0,
              "decode_layers: ", kWeights, " weights per block and a final norm expected for ", L, " blocks, got ", w.size());
  const int64_t B = x0.size(0), C = x0.size(1), D = k_cache[0].size(-1), QKV = (H + 2 * Hkv) * D;
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == B && pos.scalar_type() == at::kLong, "decode_layers: pos must be (B,) int64");
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "decode_layers: n_head ", H, " is not a multiple of n_kv_head ", Hkv);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.numel() == B * D && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "decode_layers: cos and sin must be fp32 (B, 1, ", D, ")");
  const at::Tensor p = pos.contiguous(), cs = cos.contiguous(), sn = sin.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t lo = *std::min_element(pp, pp + B), hi = *std::max_element(pp, pp + B), S = hi + 1;
  TORCH_CHECK(lo >= 0, "decode_layers: negative position ", lo);
  const int64_t F = w[7].size(0) / 2;  // gate|up outputs
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& k = k_cache[l];
    TORCH_CHECK(k.dim() == 4 && k.size(0) >= B && k.size(1) == Hkv && k.size(2) > hi && k.size(3) == D && k.sizes() == v_cache[l].sizes() &&
                    (k.scalar_type() == at::kFloat || k.scalar_type() == at::kHalf) && v_cache[l].scalar_type() == k.scalar_type() && k.stride(3) == 1 &&
                    v_cache[l].stride(3) == 1,
                "decode_layers: block ", l, "'s cache ", k.sizes(), " does not hold ", B, " rows of ", Hkv, " heads up to position ", hi);
    const at::Tensor* lw = w.data() + l * kWeights;
    for (const int i : {0, 6})
      TORCH_CHECK(lw[i].scalar_type() == at::kFloat && lw[i].is_contiguous() && lw[i].numel() == C, "decode_layers: block ", l,
                  "'s norm weight must be ", C, " contiguous fp32 values");
    TORCH_CHECK(lw[3].numel() == 0 || (lw[3].scalar_type() == at::kFloat && lw[3].is_contiguous() && lw[3].numel() == QKV),
                "decode_layers: block ", l, "'s q|k|v bias must be ", QKV, " contiguous fp32 values");
    chatforge_native::check_block_linear("decode_layers q|k|v", C, QKV, lw[1], lw[2]);
    chatforge_native::check_block_linear("decode_layers out", H * D, C, lw[4], lw[5]);
    chatforge_native::check_block_linear("decode_layers gate|up", C, 2 * F, lw[7], lw[8]);
    chatforge_native::check_block_linear("decode_layers down", F, C, lw[9], lw[10]);
  }
  // rows at different positions: row b may attend to s <= pos[b] (the eager step's mask)
  std::vector<uint8_t> mask;
  if (lo != hi) {
    mask.resize(B * S);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s) mask[b * S + s] = s <= pp[b];
  }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  at::Tensor x = x0.contiguous().clone();  // the residual stream, updated in place
  float* xp = x.data_ptr<float>();
  // every block's intermediate rows, reused: normed x, q|k|v, rotated queries, attention, gate|up, the MLP's hidden, a matmul's output
  std::vector<float> buf(B * (C + QKV + 2 * H * D + 3 * F + C));
  float *hn = buf.data(), *qkv = hn + B * C, *q = qkv + B * QKV, *att = q + B * H * D, *gu = att + B * H * D, *hid = gu + B * 2 * F,
        *out = hid + B * F;
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  const auto add_to_x = [&] {  // x = x + out: the eager step's residual add
    for (int64_t i = 0; i < B * C; ++i) xp[i] = xp[i] + out[i];
  };
  // row b's new key or value of kv head h into the cache at pos[b]; to fp16 as torch's copy rounds
  // (to nearest), but held to the largest finite fp16 rather than made infinite (as SlotCache does)
  const auto put = [&](const chatforge_native::CacheView& cv, int64_t b, int64_t h, const float* from) {
    const int64_t at = b * cv.row + h * cv.head + pp[b] * cv.pos;
    if (!cv.fp16) {
      std::copy_n(from, D, static_cast<float*>(const_cast<void*>(cv.data)) + at);
      return;
    }
    c10::Half* to = static_cast<c10::Half*>(const_cast<void*>(cv.data)) + at;
    for (int64_t i = 0; i < D; ++i) to[i] = c10::Half(std::clamp(from[i], -65504.f, 65504.f));
  };
  std::vector<float> key(D);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* lw = w.data() + l * kWeights;
    const chatforge_native::CacheView kv = chatforge_native::cache_view(k_cache[l]), vv = chatforge_native::cache_view(v_cache[l]);
    chatforge_native::rms_norm_rows(xp, lw[0].data_ptr<float>(), hn, B, C, static_cast<float>(eps));
    chatforge_native::block_linear_into(hn, B, C, lw[1], lw[2], qkv);
    if (lw[3].numel()) {
      const float* bias = lw[3].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < QKV; ++i) qkv[b * QKV + i] = qkv[b * QKV + i] + bias[i];
    }
    for (int64_t b = 0; b < B; ++b) {
      const float* r = qkv + b * QKV;
      // query and key heads rotated together, as model.Attention does; the new key and value straight into the cache
      for (int64_t n = 0; n < H + Hkv; ++n) {
        chatforge_native::rope_row(r + n * D, cp + b * D, sp + b * D, n < H ? q + (b * H + n) * D : key.data(), D);
        if (n >= H) put(kv, b, n - H, key.data());
      }
      for (int64_t h = 0; h < Hkv; ++h) put(vv, b, h, r + (H + Hkv + h) * D);
    }
    chatforge_native::decode_attention_into(q, kv, vv, mask.empty() ? nullptr : reinterpret_cast<const bool*>(mask.data()), B, H, Hkv, S,
                                            D, scale, att);
    chatforge_native::block_linear_into(att, B, H * D, lw[4], lw[5], out);
    add_to_x();
    chatforge_native::rms_norm_rows(xp, lw[6].data_ptr<float>(), hn, B, C, static_cast<float>(eps));
    chatforge_native::block_linear_into(hn, B, C, lw[7], lw[8], gu);
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)), [&](int64_t r0, int64_t r1) {  // swiglu's grain
      chatforge_native::swiglu_rows(gu + r0 * 2 * F, hid + r0 * F, r1 - r0, F);
    });
    chatforge_native::block_linear_into(hid, B, F, lw[9], lw[10], out);
    add_to_x();
  }
  return chatforge_native::rms_norm(x, w[L * kWeights], eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) {
  m.def("decode_layers(Tensor x, Tensor[] w, Tensor(a!)[] k_cache, Tensor(b!)[] v_cache, Tensor pos, Tensor cos, Tensor sin, "
        "int n_head, int n_kv_head, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) { m.impl("decode_layers", &decode_layers); }
