// Causal attention for training in bf16 on the CPU, forward and backward, in blocks of 64 queries by
// 64 keys (the blocked form of Dao et al.'s FlashAttention-2: the T x T scores never exist whole).
// torch's CPU kernel for the same runs its block products as general bf16 GEMM calls at 45-115
// GFLOP/s on an AVX-512 BF16 CPU whose bf16 matmul peak is ~430 (benchmarks/README.md): a training
// step of a 512-wide model spent ~28% of its time there. Here every product is one register-tiled
// loop of vdpbf16ps (bf16 pairs multiplied and summed into fp32 lanes) over operands packed once
// per sequence and head; scores, softmax and gradients of the scores stay in fp32 and are rounded to
// bf16 only as the next product's input. Without AVX-512 BF16 the same blocks run on a plain
// loop (correct, slow: training picks bf16 only where the CPU has it, dtypes.fast_bf16).
//
// causal_attention_fwd(q (B, H, T, D), k and v (B, K, T, D), bf16, any strides but the last; scale)
//   -> (out (B, H, T, D) bf16 whose memory is (B, T, H, D): the layout the output projection reads,
//       lse (B, H, T) fp32: each row's log-sum-exp of its scaled scores, kept for the backward)
// causal_attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv), each bf16 in
//   (B, T, heads, D) memory. Query head h reads key/value head h / (H / K). D a multiple of 16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

using chatforge_simd::Simd;
using bf16 = uint16_t;
constexpr int64_t kBlock = 64;  // queries and keys per block: a 64 x 64 fp32 score block is 16 KB, in L1
constexpr int kRows = 4, kTiles = 4;  // a product's register tile: 4 rows by 4 x 16 columns, 16 accumulators

inline float to_f32(bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 to_bf16(float f) {  // round to nearest even, as torch's conversion
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((u >> 16) | 0x40);  // NaN stays NaN
  return static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

void round_row(const float* x, int64_t n, bf16* y) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i))));
#endif
  for (; i < n; ++i) y[i] = to_bf16(x[i]);
}

// C (MR x 16 NT, row stride ldc) = or += A times B: A's rows are bf16 with the inner index
// contiguous (row stride lda), read a pair at a time; B holds, for inner pair p and column tile t
// (16 columns), the 32 values at B + p * bp + t * bt ordered [column][pair member].
template <int MR, int NT>
void tile(const bf16* A, int64_t lda, const bf16* B, int64_t bp, int64_t bt, int64_t pairs, float* C, int64_t ldc, bool add) {
#if defined(__AVX512BF16__)
  __m512 c[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) c[m][t] = add ? _mm512_loadu_ps(C + m * ldc + 16 * t) : _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[NT];
    for (int t = 0; t < NT; ++t) b[t] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(B + p * bp + t * bt));
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * p, 4);
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int t = 0; t < NT; ++t) c[m][t] = _mm512_dpbf16_ps(c[m][t], a, b[t]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(C + m * ldc + 16 * t, c[m][t]);
#else
  float c[MR][16 * NT];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < 16 * NT; ++n) c[m][n] = add ? C[m * ldc + n] : 0.f;
  for (int64_t p = 0; p < pairs; ++p)
    for (int m = 0; m < MR; ++m) {
      const float a0 = to_f32(A[m * lda + 2 * p]), a1 = to_f32(A[m * lda + 2 * p + 1]);
      for (int t = 0; t < NT; ++t) {
        const bf16* b = B + p * bp + t * bt;
        for (int n = 0; n < 16; ++n) c[m][16 * t + n] += a0 * to_f32(b[2 * n]) + a1 * to_f32(b[2 * n + 1]);
      }
    }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < 16 * NT; ++n) C[m * ldc + n] = c[m][n];
#endif
}

// The product over M rows (a multiple of kRows) by N columns (a multiple of 16) in register tiles.
void product(int64_t M, int64_t N, const bf16* A, int64_t lda, const bf16* B, int64_t bp, int64_t bt, int64_t pairs, float* C,
             int64_t ldc, bool add) {
  for (int64_t m = 0; m < M; m += kRows) {
    const bf16* a = A + m * lda;
    float* c = C + m * ldc;
    int64_t t = 0;
    for (; t + kTiles <= N / 16; t += kTiles) tile<kRows, kTiles>(a, lda, B + t * bt, bp, bt, pairs, c + 16 * t, ldc, add);
    switch (N / 16 - t) {
      case 3: tile<kRows, 3>(a, lda, B + t * bt, bp, bt, pairs, c + 16 * t, ldc, add); break;
      case 2: tile<kRows, 2>(a, lda, B + t * bt, bp, bt, pairs, c + 16 * t, ldc, add); break;
      case 1: tile<kRows, 1>(a, lda, B + t * bt, bp, bt, pairs, c + 16 * t, ldc, add); break;
      default: break;
    }
  }
}

// One (batch, head) slice of a (B, heads, T, D) tensor: rows of D bf16 at a stride.
struct Rows {
  const bf16* p;
  int64_t stride;
};

Rows slice(const at::Tensor& x, int64_t b, int64_t h) {
  return {reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>()) + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

// The packed operands, each Tp x D values (Tp: T rounded up to the block; the padding zeros), in
// which a block of rows starts at block * kBlock * D:
// rows:  [Tp][D], the A operand of products over D;
// pairs: [Tp / 2][D][2], two rows interleaved: the B operand of products over rows (P V, dS K, ...);
// tiles: [Tp / 16][D / 2][16][2], 16 rows' pairs of columns: the B operand of products over D (Q K^T).
void pack_rows(Rows x, int64_t T, int64_t Tp, int64_t D, bf16* out) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * D, x.p + t * x.stride, D * sizeof(bf16));
  std::memset(out + T * D, 0, (Tp - T) * D * sizeof(bf16));
}

void pack_pairs(const bf16* rows, int64_t Tp, int64_t D, bf16* out) {
  for (int64_t r = 0; r < Tp / 2; ++r)
    for (int64_t d = 0; d < D; ++d) {
      out[(r * D + d) * 2] = rows[2 * r * D + d];
      out[(r * D + d) * 2 + 1] = rows[(2 * r + 1) * D + d];
    }
}

void pack_tiles(const bf16* rows, int64_t Tp, int64_t D, bf16* out) {
  for (int64_t t = 0; t < Tp / 16; ++t)
    for (int64_t p = 0; p < D / 2; ++p)
      for (int64_t n = 0; n < 16; ++n) {
        bf16* o = out + ((t * (D / 2) + p) * 16 + n) * 2;
        o[0] = rows[(16 * t + n) * D + 2 * p];
        o[1] = rows[(16 * t + n) * D + 2 * p + 1];
      }
}

void transpose_block(const bf16* x, bf16* y) {  // kBlock x kBlock
  for (int64_t i = 0; i < kBlock; ++i)
    for (int64_t j = 0; j < kBlock; ++j) y[j * kBlock + i] = x[i * kBlock + j];
}

inline int64_t padded(int64_t T) { return (T + kBlock - 1) / kBlock * kBlock; }

float row_max(const float* s, int64_t n) {
  Simd::V m = Simd::set1(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  float r = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, Simd::load(s + i));
  r = _mm512_reduce_max_ps(m);
#endif
  (void)m;
  for (; i < n; ++i) r = std::max(r, s[i]);
  return r;
}

// p[i] = exp(s[i] * scale - shift) for i < n and 0 up to kBlock; returns their sum.
float exp_row(const float* s, int64_t n, float scale, float shift, float* p) {
  const Simd::V sc = Simd::set1(scale), sh = Simd::set1(-shift);
  Simd::V acc = Simd::zero();
  int64_t i = 0;
  for (; i + Simd::kLanes <= n; i += Simd::kLanes) {
    const Simd::V e = Simd::exp(Simd::fmadd(Simd::load(s + i), sc, sh));
    Simd::store(p + i, e);
    acc = Simd::add(acc, e);
  }
  float sum = Simd::sum(acc);
  for (; i < n; ++i) sum += (p[i] = std::exp(s[i] * scale - shift));
  for (; i < kBlock; ++i) p[i] = 0.f;
  return sum;
}

void check(const at::Tensor& x, const char* name, int64_t heads_dim) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1,
              "causal_attention: ", name, " must be a CPU bf16 (B, heads, T, D) tensor with contiguous rows");
  TORCH_CHECK(x.size(3) % 16 == 0, "causal_attention: head dim ", x.size(3), " is not a multiple of 16");
  (void)heads_dim;
}

}  // namespace

namespace chatforge_native {

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check(q, "q", 1), check(k, "k", 1), check(v, "v", 1);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == D && H % K == 0,
              "causal_attention: q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(), " do not match");
  const int64_t Tp = padded(T), blocks = Tp / kBlock;
  auto out = at::empty({B, T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  bf16* o = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  float* l = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<bf16> qr(Tp * D), kr(Tp * D), kt(Tp * D), vr(Tp * D), vp(Tp * D), p(kBlock * kBlock), orow(D);
    std::vector<float> s(kBlock * kBlock), acc(kBlock * D), mx(kBlock), sum(kBlock), e(kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H, g = h / (H / K);
      pack_rows(slice(q, b, h), T, Tp, D, qr.data());
      pack_rows(slice(k, b, g), T, Tp, D, kr.data());
      pack_tiles(kr.data(), Tp, D, kt.data());
      pack_rows(slice(v, b, g), T, Tp, D, vr.data());
      pack_pairs(vr.data(), Tp, D, vp.data());
      for (int64_t i = 0; i < blocks; ++i) {
        std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
        std::fill(sum.begin(), sum.end(), 0.f);
        for (int64_t j = 0; j <= i; ++j) {
          product(kBlock, kBlock, qr.data() + i * kBlock * D, D, kt.data() + j * kBlock * D, 32, D * 16, D / 2, s.data(), kBlock, false);
          for (int64_t r = 0; r < kBlock; ++r) {
            const int64_t n = j < i ? kBlock : r + 1;  // keys this query may see in the block
            const float m = std::max(mx[r], row_max(s.data() + r * kBlock, n) * sc);
            const float keep = std::exp(mx[r] - m);  // 0 at the first block (mx = -inf)
            sum[r] = sum[r] * keep + exp_row(s.data() + r * kBlock, n, sc, m, e.data());
            mx[r] = m;
            round_row(e.data(), kBlock, p.data() + r * kBlock);
            float* a = acc.data() + r * D;
            if (j == 0) std::fill(a, a + D, 0.f);
            else if (keep != 1.f)
              for (int64_t d = 0; d < D; ++d) a[d] *= keep;
          }
          product(kBlock, D, p.data(), kBlock, vp.data() + j * kBlock * D, 2 * D, 32, kBlock / 2, acc.data(), D, true);
        }
        for (int64_t r = 0; r < kBlock && i * kBlock + r < T; ++r) {
          const int64_t t = i * kBlock + r;
          const float inv = 1.f / sum[r];
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= inv;
          round_row(acc.data() + r * D, D, o + ((b * T + t) * H + h) * D);
          l[(b * H + h) * T + t] = mx[r] + std::log(sum[r]);
        }
      }
    }
  });
  return {out.permute({0, 2, 1, 3}), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                                    double scale) {
  check(dout, "grad_out", 1), check(q, "q", 1), check(k, "k", 1), check(v, "v", 1), check(out, "out", 1);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1), G = H / K;
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && k.sizes() == v.sizes() && H % K == 0 &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == B * H * T,
              "causal_attention backward: shapes do not match");
  const int64_t Tp = padded(T), blocks = Tp / kBlock, n = Tp * D;
  auto dq = at::empty({B, T, H, D}, q.options()), dk = at::empty({B, T, K, D}, q.options()), dv = at::empty({B, T, K, D}, q.options());
  bf16* dqp = reinterpret_cast<bf16*>(dq.data_ptr<at::BFloat16>());
  bf16* dkp = reinterpret_cast<bf16*>(dk.data_ptr<at::BFloat16>());
  bf16* dvp = reinterpret_cast<bf16*>(dv.data_ptr<at::BFloat16>());
  const float* lsep = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * K, 1, [&](int64_t t0, int64_t t1) {
    // per query head of the group: rows and pairs of q and grad_out, fp32 dq, the rows' lse and
    // sum(grad_out * out); once for the key/value head: k as tiles and pairs, v as tiles
    std::vector<bf16> qr(G * n), qp(G * n), gr(G * n), gp(G * n), kr(n), kt(n), kp(n), vr(n), vt(n);
    std::vector<float> dqa(G * n), ls(G * Tp), dd(G * Tp);
    std::vector<float> s(kBlock * kBlock), dp(kBlock * kBlock), dka(kBlock * D), dva(kBlock * D);
    std::vector<bf16> p(kBlock * kBlock), pt(kBlock * kBlock), ds(kBlock * kBlock), dst(kBlock * kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / K, g = task % K;
      pack_rows(slice(k, b, g), T, Tp, D, kr.data());
      pack_tiles(kr.data(), Tp, D, kt.data());
      pack_pairs(kr.data(), Tp, D, kp.data());
      pack_rows(slice(v, b, g), T, Tp, D, vr.data());
      pack_tiles(vr.data(), Tp, D, vt.data());
      for (int64_t e = 0; e < G; ++e) {
        const int64_t h = g * G + e;
        pack_rows(slice(q, b, h), T, Tp, D, qr.data() + e * n);
        pack_pairs(qr.data() + e * n, Tp, D, qp.data() + e * n);
        pack_rows(slice(dout, b, h), T, Tp, D, gr.data() + e * n);
        pack_pairs(gr.data() + e * n, Tp, D, gp.data() + e * n);
        const Rows o = slice(out, b, h);
        for (int64_t t = 0; t < Tp; ++t) {
          float acc = 0.f;
          if (t < T)
            for (int64_t d = 0; d < D; ++d) acc += to_f32(gr[e * n + t * D + d]) * to_f32(o.p[t * o.stride + d]);
          dd[e * Tp + t] = acc;  // padded rows: grad_out 0, so dS and their share of dV are 0
          ls[e * Tp + t] = t < T ? lsep[(b * H + h) * T + t] : 0.f;
        }
      }
      std::fill(dqa.begin(), dqa.end(), 0.f);
      for (int64_t j = 0; j < blocks; ++j) {
        std::fill(dka.begin(), dka.end(), 0.f);
        std::fill(dva.begin(), dva.end(), 0.f);
        for (int64_t e = 0; e < G; ++e)
          for (int64_t i = j; i < blocks; ++i) {
            const int64_t at_i = e * n + i * kBlock * D, at_j = j * kBlock * D;
            product(kBlock, kBlock, qr.data() + at_i, D, kt.data() + at_j, 32, D * 16, D / 2, s.data(), kBlock, false);
            product(kBlock, kBlock, gr.data() + at_i, D, vt.data() + at_j, 32, D * 16, D / 2, dp.data(), kBlock, false);
            for (int64_t r = 0; r < kBlock; ++r) {
              const int64_t t = i * kBlock + r, seen = i > j ? kBlock : r + 1;
              float* sr = s.data() + r * kBlock;  // becomes P, then dS, in fp32
              exp_row(sr, seen, sc, ls[e * Tp + t], sr);
              round_row(sr, kBlock, p.data() + r * kBlock);
              const float* dpr = dp.data() + r * kBlock;
              const float di = dd[e * Tp + t];
              for (int64_t c = 0; c < kBlock; ++c) sr[c] = sr[c] * (dpr[c] - di) * sc;
              round_row(sr, kBlock, ds.data() + r * kBlock);
            }
            transpose_block(p.data(), pt.data());
            transpose_block(ds.data(), dst.data());
            product(kBlock, D, pt.data(), kBlock, gp.data() + at_i, 2 * D, 32, kBlock / 2, dva.data(), D, true);
            product(kBlock, D, dst.data(), kBlock, qp.data() + at_i, 2 * D, 32, kBlock / 2, dka.data(), D, true);
            product(kBlock, D, ds.data(), kBlock, kp.data() + at_j, 2 * D, 32, kBlock / 2, dqa.data() + at_i, D, true);
          }
        for (int64_t r = 0; r < kBlock && j * kBlock + r < T; ++r) {
          const int64_t t = j * kBlock + r;
          round_row(dka.data() + r * D, D, dkp + ((b * T + t) * K + g) * D);
          round_row(dva.data() + r * D, D, dvp + ((b * T + t) * K + g) * D);
        }
      }
      for (int64_t e = 0; e < G; ++e)
        for (int64_t t = 0; t < T; ++t) round_row(dqa.data() + e * n + t * D, D, dqp + ((b * T + t) * H + g * G + e) * D);
    }
  });
  return {dq.permute({0, 2, 1, 3}), dk.permute({0, 2, 1, 3}), dv.permute({0, 2, 1, 3})};
}

bool causal_attention_native() {  // whether the products run on vdpbf16ps (else the plain loop)
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace chatforge_native

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("causal_attention_native() -> bool", &chatforge_native::causal_attention_native);
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) {
  m.impl("causal_attention_fwd", &chatforge_native::causal_attention_fwd);
  m.impl("causal_attention_bwd", &chatforge_native::causal_attention_bwd);
}
