// Attention of one new query per row over a slot cache, in fp32: a decode step's attention.
// The cache may hold fp16 (half the bytes a step reads), widened to fp32 as it is loaded.
// torch's fused kernel spends most of such a call on set-up for query blocks that a decode step
// does not have (benchmarks/README.md). Here a task is one row's key/value head over a chunk of
// kChunk positions: for each query head of its group, scores against the chunk's keys and their
// softmax numerators; then the weighted sums of values, several heads per pass over the value
// rows; so the group reads the chunk from memory once (at long contexts the cache outweighs the
// model's int4 weights); then each (row, query head) adds its chunks up under their common top
// score. The chunks are fixed, not one per thread, so the sums do not depend on the thread count.
//
// decode_attention(q (B, H, D), k and v (B, Hkv, S, D) with any strides but the last, mask (B, S)
// bool or None (True: may attend), scale) -> (B, H, D); query head h reads key/value head
// h / (H / Hkv). A row that may attend to nothing gets zeros.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace {

using chatforge_simd::softmax_numerators;
using chatforge_simd::Simd;

constexpr int64_t kChunk = 128;  // positions per task

// out (D, zeros) = scale * sum over s of p[s] * v[s]: the output row in registers (NV vectors)
// while every value row streams past, where D is NV vectors; else a pass per value row
template <int NV, typename T>
void weighted_rows(const float* p, int64_t S, float scale, const T* v, int64_t stride, float* out) {
  Simd::V acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = Simd::zero();
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;  // masked
    const Simd::V w = Simd::set1(p[s]);
    for (int j = 0; j < NV; ++j) acc[j] = Simd::fmadd(w, Simd::load(v + s * stride + j * Simd::kLanes), acc[j]);
  }
  for (int j = 0; j < NV; ++j) Simd::store(out + j * Simd::kLanes, Simd::mul(acc[j], Simd::set1(scale)));
}

template <typename T>
void weighted_sum(const float* p, int64_t S, float scale, const T* v, int64_t stride, int64_t D, float* out) {
  if (D == Simd::kLanes * 8) return weighted_rows<8, T>(p, S, scale, v, stride, out);
  if (D == Simd::kLanes * 4) return weighted_rows<4, T>(p, S, scale, v, stride, out);
  if (D == Simd::kLanes * 2) return weighted_rows<2, T>(p, S, scale, v, stride, out);
  for (int64_t s = 0; s < S; ++s) {
    if (p[s] == 0.f) continue;
    const float a = p[s] * scale;
    int64_t i = 0;
    for (; i + Simd::kLanes <= D; i += Simd::kLanes)
      Simd::store(out + i, Simd::fmadd(Simd::set1(a), Simd::load(v + s * stride + i), Simd::load(out + i)));
    for (; i < D; ++i) out[i] += a * static_cast<float>(v[s * stride + i]);
  }
}

// p[g * kChunk + s] = scale * (q[g] . k[s]) for the group's query heads g and s < S: kLanes keys
// at a time for every head while they are in L1, each key's products summed as a vector along
// its row (rows read in address order, which the hardware prefetches best: reading the kLanes rows
// side by side measured slower from memory) and the kLanes vectors reduced together (Simd::sums),
// not one horizontal sum per key
template <typename T>
void scores(const float* q, int64_t group, const T* k, int64_t stride, int64_t S, int64_t D, float scale, float* p) {
  int64_t s = 0;
  if (D % Simd::kLanes == 0 && Simd::kLanes > 1) {
    Simd::V acc[Simd::kLanes];
    for (; s + Simd::kLanes <= S; s += Simd::kLanes) {
      const T* ks = k + s * stride;
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q + g * D;
        for (int j = 0; j < Simd::kLanes; ++j) {
          const T* kj = ks + j * stride;
          Simd::V a = Simd::mul(Simd::load(qg), Simd::load(kj));
          for (int64_t i = Simd::kLanes; i < D; i += Simd::kLanes) a = Simd::fmadd(Simd::load(qg + i), Simd::load(kj + i), a);
          acc[j] = a;
        }
        Simd::store(p + g * kChunk + s, Simd::mul(Simd::sums(acc), Simd::set1(scale)));
      }
    }
  }
  for (; s < S; ++s)
    for (int64_t g = 0; g < group; ++g) {
      float a = 0.f;
      for (int64_t i = 0; i < D; ++i) a += q[g * D + i] * static_cast<float>(k[s * stride + i]);
      p[g * kChunk + s] = a * scale;
    }
}

// out[g] (D) = sum over s of p[g * kChunk + s] * v[s] for GB query heads of a group at once: each
// value row is loaded once for all of them, GB x NV accumulators (D = NV vectors). Every p counts,
// so only for chunks with no masked position (a masked one may hold anything, even NaN).
template <int NV, int GB, typename T>
void weighted_heads(const float* p, int64_t S, const T* v, int64_t stride, float* const* out) {
  Simd::V acc[GB][NV];
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < NV; ++j) acc[g][j] = Simd::zero();
  for (int64_t s = 0; s < S; ++s) {
    Simd::V row[NV];
    for (int j = 0; j < NV; ++j) row[j] = Simd::load(v + s * stride + j * Simd::kLanes);
    for (int g = 0; g < GB; ++g) {
      const Simd::V w = Simd::set1(p[g * kChunk + s]);
      for (int j = 0; j < NV; ++j) acc[g][j] = Simd::fmadd(w, row[j], acc[g][j]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int j = 0; j < NV; ++j) Simd::store(out[g] + j * Simd::kLanes, acc[g][j]);
}

// heads at a time that keep their accumulators, a value row and a weight in registers
constexpr int heads_at_once(int nv) { return std::clamp((Simd::kRegs - nv - 2) / nv, 1, 4); }

template <int NV, typename T>
void weighted_group(const float* p, int64_t group, int64_t S, const T* v, int64_t stride, float* const* out) {
  constexpr int kMax = heads_at_once(NV);
  for (int64_t g0 = 0; g0 < group; g0 += kMax) {
    const float* pg = p + g0 * kChunk;
    float* const* og = out + g0;
    switch (std::min<int64_t>(kMax, group - g0)) {
      case 1: weighted_heads<NV, 1, T>(pg, S, v, stride, og); break;
      case 2: if constexpr (kMax >= 2) weighted_heads<NV, 2, T>(pg, S, v, stride, og); break;
      case 3: if constexpr (kMax >= 3) weighted_heads<NV, 3, T>(pg, S, v, stride, og); break;
      default: if constexpr (kMax >= 4) weighted_heads<NV, 4, T>(pg, S, v, stride, og); break;
    }
  }
}

// the group's weighted sums where D is 1, 2, 4 or 8 vectors; false elsewhere (the caller goes head by head)
template <typename T>
bool weighted_groups(const float* p, int64_t group, int64_t S, const T* v, int64_t stride, int64_t D, float* const* out) {
  if (Simd::kLanes == 1) return false;
  switch (D == Simd::kLanes * (D / Simd::kLanes) ? D / Simd::kLanes : 0) {
    case 1: weighted_group<1, T>(p, group, S, v, stride, out); return true;
    case 2: weighted_group<2, T>(p, group, S, v, stride, out); return true;
    case 4: weighted_group<4, T>(p, group, S, v, stride, out); return true;
    case 8: weighted_group<8, T>(p, group, S, v, stride, out); return true;
    default: return false;
  }
}

}  // namespace

namespace chatforge_native {

void decode_attention_into(const float* q, const CacheView& k, const CacheView& v, const bool* mask, int64_t B, int64_t H,
                           int64_t Hkv, int64_t S, int64_t D, float scale, float* out) {
  const int64_t group = H / Hkv, chunks = (S + kChunk - 1) / kChunk, W = D + 2;
  const float none = -std::numeric_limits<float>::infinity();
  // per (row, query head, chunk): the chunk's top score, its softmax numerators' sum, and their
  // weighted sum of values (D floats)
  std::vector<float> part(B * H * chunks * W);
  at::parallel_for(0, B * Hkv * chunks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(group * kChunk);
    std::vector<float*> outs(group);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (Hkv * chunks), kh = t / chunks % Hkv, c = t % chunks, s0 = c * kChunk, n = std::min(kChunk, S - s0);
      const bool* mt = mask ? mask + b * S + s0 : nullptr;
      const auto run = [&](const auto* kt, const auto* vt) {
        const bool masked = mt && std::find(mt, mt + n, false) != mt + n;
        scores(q + (b * H + kh * group) * D, group, kt, k.pos, n, D, scale, p.data());
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = kh * group + g;
          float* pr = part.data() + ((b * H + h) * chunks + c) * W;
          float* ph = p.data() + g * kChunk;
          outs[g] = pr + 2;
          float top = none;
          for (int64_t s = 0; s < n; ++s) {
            if (mt && !mt[s]) ph[s] = none;
            top = std::max(top, ph[s]);
          }
          pr[0] = top;
          if (top == none) continue;  // nothing to attend to in this chunk
          pr[1] = softmax_numerators(ph, n, 1.f, top, ph);  // scores scaled already
          if (masked) {
            std::fill(pr + 2, pr + W, 0.f);
            weighted_sum(ph, n, 1.f, vt, v.pos, D, pr + 2);
          }
        }
        if (!masked && !weighted_groups(p.data(), group, n, vt, v.pos, D, outs.data()))
          for (int64_t g = 0; g < group; ++g) {
            std::fill(outs[g], outs[g] + D, 0.f);
            weighted_sum(p.data() + g * kChunk, n, 1.f, vt, v.pos, D, outs[g]);
          }
      };
      const int64_t ka = b * k.row + kh * k.head + s0 * k.pos, va = b * v.row + kh * v.head + s0 * v.pos;
      if (k.fp16)
        run(static_cast<const c10::Half*>(k.data) + ka, static_cast<const c10::Half*>(v.data) + va);
      else
        run(static_cast<const float*>(k.data) + ka, static_cast<const float*>(v.data) + va);
    }
  });
  // each row and head: its chunks' sums brought to a common top score, divided by their total (a
  // second parallel region only where there are many: its start costs more than a few rows' sums)
  at::parallel_for(0, B * H, std::max<int64_t>(1, 65536 / std::max<int64_t>(chunks * D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* pr = part.data() + r * chunks * W;
      float* o = out + r * D;
      std::fill(o, o + D, 0.f);
      float top = none, total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, pr[c * W]);
      if (top == none) continue;  // a row that may attend to nothing: zeros
      for (int64_t c = 0; c < chunks; ++c) {
        if (pr[c * W] == none) continue;
        const float e = std::exp(pr[c * W] - top);
        total += e * pr[c * W + 1];
        for (int64_t i = 0; i < D; ++i) o[i] += e * pr[c * W + 2 + i];
      }
      const float inv = 1.f / total;
      for (int64_t i = 0; i < D; ++i) o[i] *= inv;
    }
  });
}

CacheView cache_view(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.scalar_type() == at::kHalf};
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "decode_attention: q (B, H, D), k and v (B, Hkv, S, D)");
  const auto cached = [](const at::Tensor& t) { return t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf; };
  TORCH_CHECK(q.scalar_type() == at::kFloat && cached(k) && v.scalar_type() == k.scalar_type(),
              "decode_attention: q fp32, k and v both fp32 or both fp16");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "decode_attention: q ", q.sizes(), " does not match k ", k.sizes(), " / v ", v.sizes());
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: keys and values must be contiguous along D");
  const at::Tensor qc = q.contiguous();
  at::Tensor m;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == B && mask->size(1) == S,
                "decode_attention: mask must be (B, S) bool");
    m = mask->contiguous();
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  decode_attention_into(qc.data_ptr<float>(), cache_view(k), cache_view(v), m.defined() ? m.data_ptr<bool>() : nullptr, B, H, Hkv, S, D,
                        static_cast<float>(scale), out.data_ptr<float>());
  return out;
}

}  // namespace chatforge_native

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) { m.impl("decode_attention", &chatforge_native::decode_attention); }
