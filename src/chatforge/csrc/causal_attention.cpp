// Causal attention for training on the CPU, forward and backward, in bf16 or fp32, in blocks of 64
// queries by 64 keys (the blocked form of Dao et al.'s FlashAttention-2: the T x T scores never
// exist whole). torch's CPU kernel for the same runs its block products as general GEMM calls: 45-120
// GFLOP/s in bf16 on an AVX-512 BF16 CPU whose bf16 matmul peak is ~430, 65-105 in fp32
// (benchmarks/README.md); a bf16 training step of a 512-wide model spent ~28% of its time there.
// Here every product is one register-tiled loop over operands packed once per sequence and head:
// vdpbf16ps (bf16 pairs multiplied and summed into fp32 lanes) for bf16, fp32 multiply-adds for fp32
// (AVX-512 or AVX2); scores, softmax and the scores' gradients stay in fp32 and are rounded to bf16
// only as the next product's input. Where the build lacks those instructions the same blocks run on
// a plain loop (correct, slow; chatforge/causal_attention.py then keeps torch's kernel).
//
// causal_attention_fwd(q (B, H, T, D), k and v (B, K, T, D), all bf16 or all fp32, any strides but
//   the last; scale) -> (out (B, H, T, D) in q's dtype whose memory is (B, T, H, D): the layout the
//   output projection reads; lse (B, H, T) fp32: each row's log-sum-exp of its scaled scores, kept
//   for the backward)
// causal_attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv), each in q's dtype in
//   (B, T, heads, D) memory. Query head h reads key/value head h / (H / K). D a multiple of 16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using chatforge_simd::Simd;
using chatforge_simd::softmax_numerators;
using bf16 = uint16_t;
constexpr int64_t kBlock = 64;  // queries and keys per block: a 64 x 64 fp32 score block is 16 KB, in L1

inline float to_f32(bf16 h) { return static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits())); }
inline float to_f32(float f) { return f; }
inline bf16 to_bf16(float f) { return c10::BFloat16(f).x; }  // torch's rounding: to nearest even

void round_row(const float* x, int64_t n, bf16* y) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i))));
#endif
  for (; i < n; ++i) y[i] = to_bf16(x[i]);
}
void round_row(const float* x, int64_t n, float* y) { std::memcpy(y, x, n * sizeof(float)); }

// Values per step of a product's inner index: bf16 products take pairs (vdpbf16ps), fp32 ones one.
template <typename E>
constexpr int64_t kPair = sizeof(float) / sizeof(E);

// C (MR x 16 NT, row stride ldc) = or += A times B: A's rows hold the inner index contiguously
// (row stride lda), read kPair values at a time; B holds, for inner step p and column tile t (16
// columns), the 16 kPair values at B + p * bp + t * bt ordered [column][pair member].
template <int MR, int NT>
void tile(const bf16* A, int64_t lda, const bf16* B, int64_t bp, int64_t bt, int64_t steps, float* C, int64_t ldc, bool add) {
#if defined(__AVX512BF16__)
  __m512 c[MR][NT];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT; ++t) c[m][t] = add ? _mm512_loadu_ps(C + m * ldc + 16 * t) : _mm512_setzero_ps();
  for (int64_t p = 0; p < steps; ++p) {
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
  for (int64_t p = 0; p < steps; ++p)
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

template <int MR, int NT>
void tile(const float* A, int64_t lda, const float* B, int64_t bp, int64_t bt, int64_t steps, float* C, int64_t ldc, bool add) {
  constexpr int V = 16 / Simd::kLanes;  // vectors per 16-column tile
  Simd::V c[MR][NT * V];
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT * V; ++t) c[m][t] = add ? Simd::load(C + m * ldc + Simd::kLanes * t) : Simd::zero();
  for (int64_t p = 0; p < steps; ++p) {
    Simd::V b[NT * V];
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < V; ++u) b[t * V + u] = Simd::load(B + p * bp + t * bt + u * Simd::kLanes);
    for (int m = 0; m < MR; ++m) {
      const Simd::V a = Simd::set1(A[m * lda + p]);
      for (int t = 0; t < NT * V; ++t) c[m][t] = Simd::fmadd(a, b[t], c[m][t]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int t = 0; t < NT * V; ++t) Simd::store(C + m * ldc + Simd::kLanes * t, c[m][t]);
}

// Register tiles (rows x 16-column tiles), each 16 accumulators of 32 vector registers on AVX-512:
// bf16 4 x 4; fp32 8 x 2 (4 x 4 measured 1.1-1.5x slower); fp32 on AVX2 (16 registers) 4 x 1,
// two vectors a tile.
template <typename E>
constexpr int kTiles = std::is_same_v<E, float> ? (Simd::kLanes < 16 ? 1 : 2) : 4;
template <typename E>
constexpr int kRows = std::is_same_v<E, float> && Simd::kLanes == 16 ? 8 : 4;

// The product over M rows (a multiple of kRows) by N columns (a multiple of 16) in register tiles.
template <typename E>
void product(int64_t M, int64_t N, const E* A, int64_t lda, const E* B, int64_t bp, int64_t bt, int64_t steps, float* C,
             int64_t ldc, bool add) {
  constexpr int NT = kTiles<E>, MR = kRows<E>;
  for (int64_t m = 0; m < M; m += MR) {
    const E* a = A + m * lda;
    float* c = C + m * ldc;
    int64_t t = 0;
    for (; t + NT <= N / 16; t += NT) tile<MR, NT>(a, lda, B + t * bt, bp, bt, steps, c + 16 * t, ldc, add);
    if constexpr (NT > 1) {
      switch (N / 16 - t) {
        case 3: tile<MR, 3>(a, lda, B + t * bt, bp, bt, steps, c + 16 * t, ldc, add); break;
        case 2: tile<MR, 2>(a, lda, B + t * bt, bp, bt, steps, c + 16 * t, ldc, add); break;
        case 1: tile<MR, 1>(a, lda, B + t * bt, bp, bt, steps, c + 16 * t, ldc, add); break;
        default: break;
      }
    }
  }
}

// One (batch, head) slice of a (B, heads, T, D) tensor: rows of D values at a stride.
template <typename E>
struct Rows {
  const E* p;
  int64_t stride;
};

template <typename E>
const E* data(const at::Tensor& x) {
  if constexpr (std::is_same_v<E, float>) return x.data_ptr<float>();
  else return reinterpret_cast<const bf16*>(x.data_ptr<at::BFloat16>());
}

template <typename E>
E* data(at::Tensor& x) { return const_cast<E*>(data<E>(static_cast<const at::Tensor&>(x))); }

template <typename E>
Rows<E> slice(const at::Tensor& x, int64_t b, int64_t h) {
  return {data<E>(x) + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

// The packed operands, each Tp x D values (Tp: T rounded up to the block; the padding zeros), in
// which a block of rows starts at block * kBlock * D (P = kPair<E>):
// rows:  [Tp][D], the A operand of products over D;
// pairs: [Tp / P][D][P], P rows interleaved: the B operand of products over rows (P V, dS K, ...);
// tiles: [Tp / 16][D / P][16][P], 16 rows by P columns: the B operand of products over D (Q K^T).
template <typename E>
void pack_rows(Rows<E> x, int64_t T, int64_t Tp, int64_t D, E* out) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(out + t * D, x.p + t * x.stride, D * sizeof(E));
  std::memset(out + T * D, 0, (Tp - T) * D * sizeof(E));
}

template <typename E>
void pack_pairs(const E* rows, int64_t Tp, int64_t D, E* out) {
  constexpr int64_t P = kPair<E>;
  if constexpr (P == 1) {
    std::memcpy(out, rows, Tp * D * sizeof(E));
  } else {
    for (int64_t r = 0; r < Tp / P; ++r)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t e = 0; e < P; ++e) out[(r * D + d) * P + e] = rows[(P * r + e) * D + d];
  }
}

template <typename E>
void pack_tiles(const E* rows, int64_t Tp, int64_t D, E* out) {
  constexpr int64_t P = kPair<E>;
  for (int64_t t = 0; t < Tp / 16; ++t)
    for (int64_t p = 0; p < D / P; ++p)
      for (int64_t n = 0; n < 16; ++n)
        for (int64_t e = 0; e < P; ++e) out[((t * (D / P) + p) * 16 + n) * P + e] = rows[(16 * t + n) * D + P * p + e];
}

template <typename E>
void transpose_block(const E* x, E* y) {  // kBlock x kBlock
  for (int64_t i = 0; i < kBlock; ++i)
    for (int64_t j = 0; j < kBlock; ++j) y[j * kBlock + i] = x[i * kBlock + j];
}

inline int64_t padded(int64_t T) { return (T + kBlock - 1) / kBlock * kBlock; }

float row_max(const float* s, int64_t n) {
  float r = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(r);
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
  r = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) r = std::max(r, s[i]);
  return r;
}

void check(const at::Tensor& x, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(x.scalar_type() == dtype && x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1, "causal_attention: ", name,
              " must be a CPU ", dtype, " (B, heads, T, D) tensor with contiguous rows, like q; got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(x.size(3) % 16 == 0, "causal_attention: head dim ", x.size(3), " is not a multiple of 16");
}

// Which keys each query may see: causal (no mask: key <= query), or a boolean mask (T x T per
// sequence and, optionally, head; True = may attend; any pattern). Per 64 x 64 block a state: kNone
// (skipped), kAll (every real key of every query: no test) or kSome (a test per score). No real
// query sees a key past T (the padding of the last block).
enum : uint8_t { kNone = 0, kAll = 1, kSome = 2 };

struct Visible {
  const bool* m = nullptr;  // the mask, or null: causal
  int64_t sb = 0, sh = 0, st = 0;  // its strides over sequence, head (0 where broadcast) and query
  int64_t T = 0, blocks = 0, heads = 1;  // heads: the mask's own head count (1 or H)
  std::vector<uint8_t> state;  // (sequence or 1, mask head, query block, key block)

  Visible(const c10::optional<at::Tensor>& mask, int64_t B, int64_t H, int64_t T_) : T(T_), blocks(padded(T_) / kBlock) {
    if (!mask.has_value() || !mask->defined()) return;
    const at::Tensor& x = *mask;
    TORCH_CHECK(x.scalar_type() == at::kBool && x.device().is_cpu() && x.dim() == 4 && x.size(2) == T && x.size(3) == T &&
                    (x.size(0) == 1 || x.size(0) == B) && (x.size(1) == 1 || x.size(1) == H) && x.stride(3) == 1,
                "causal_attention: mask must be a CPU bool (B or 1, H or 1, T, T) tensor with contiguous rows; got ",
                x.scalar_type(), " ", x.sizes());
    m = x.data_ptr<bool>();
    heads = x.size(1);
    sb = x.size(0) > 1 ? x.stride(0) : 0, sh = heads > 1 ? x.stride(1) : 0, st = x.stride(2);
    const int64_t maps = x.size(0) * heads;
    state.resize(maps * blocks * blocks);
    at::parallel_for(0, maps * blocks, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t map = r / blocks, i = r % blocks;
        const bool* base = m + (map / heads) * x.stride(0) + (map % heads) * (heads > 1 ? x.stride(1) : 0);
        for (int64_t j = 0; j < blocks; ++j) {
          int64_t seen = 0, all = 0;
          for (int64_t t = i * kBlock; t < std::min(T, (i + 1) * kBlock); ++t)
            for (int64_t c = j * kBlock; c < std::min(T, (j + 1) * kBlock); ++c) seen += base[t * st + c], ++all;
          const bool whole = all == kBlock * kBlock;  // a block with padding is tested per score
          state[r * blocks + j] = seen == 0 ? kNone : (seen == all && whole ? kAll : kSome);
        }
      }
    });
  }

  uint8_t at(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (m == nullptr) return j < i ? kAll : (j == i ? kSome : kNone);
    const int64_t map = (sb ? b : 0) * heads + (heads > 1 ? h : 0);
    return state[(map * blocks + i) * blocks + j];
  }

  // Scores row t of block j: the keys this query may not see set to -inf (exp makes them 0).
  // Without a mask, the causal rule cuts the row after key t.
  void hide(int64_t b, int64_t h, int64_t t, int64_t j, float* row) const {
    const int64_t c0 = j * kBlock;
    if (m == nullptr) {
      for (int64_t c = std::max<int64_t>(t + 1 - c0, 0); c < kBlock; ++c) row[c] = -std::numeric_limits<float>::infinity();
      return;
    }
    if (t >= T) {  // a padding query: sees nothing (its gradient is 0)
      std::fill(row, row + kBlock, -std::numeric_limits<float>::infinity());
      return;
    }
    const bool* mt = m + b * sb + h * sh + t * st + c0;
    for (int64_t c = 0; c < kBlock; ++c)
      if (c0 + c >= T || !mt[c]) row[c] = -std::numeric_limits<float>::infinity();
  }
};

template <typename E>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Visible& vis, float sc, at::Tensor& out,
             at::Tensor& lse) {
  constexpr int64_t P = kPair<E>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1);
  const int64_t Tp = padded(T), blocks = Tp / kBlock;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  E* o = data<E>(out);
  float* l = lse.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<E> qr(Tp * D), kr(Tp * D), kt(Tp * D), vr(Tp * D), vp(Tp * D), p(kBlock * kBlock);
    std::vector<float> s(kBlock * kBlock), acc(kBlock * D), mx(kBlock), sum(kBlock), e(kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H, g = h / (H / K);
      pack_rows(slice<E>(q, b, h), T, Tp, D, qr.data());
      pack_rows(slice<E>(k, b, g), T, Tp, D, kr.data());
      pack_tiles(kr.data(), Tp, D, kt.data());
      pack_rows(slice<E>(v, b, g), T, Tp, D, vr.data());
      pack_pairs(vr.data(), Tp, D, vp.data());
      for (int64_t i = 0; i < blocks; ++i) {
        std::fill(mx.begin(), mx.end(), -kInf);
        std::fill(sum.begin(), sum.end(), 0.f);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < blocks; ++j) {
          const uint8_t state = vis.at(b, h, i, j);
          if (state == kNone) continue;
          product(kBlock, kBlock, qr.data() + i * kBlock * D, D, kt.data() + j * kBlock * D, 16 * P, D * 16, D / P, s.data(), kBlock, false);
          for (int64_t r = 0; r < kBlock; ++r) {
            float* sr = s.data() + r * kBlock;
            if (state == kSome) vis.hide(b, h, i * kBlock + r, j, sr);
            const float m = std::max(mx[r], row_max(sr, kBlock) * sc);
            if (m == -kInf) {  // nothing seen yet in this row
              std::fill(p.data() + r * kBlock, p.data() + (r + 1) * kBlock, E(0));
              continue;
            }
            const float keep = std::exp(mx[r] - m);  // 0 where this is the row's first key (mx = -inf)
            sum[r] = sum[r] * keep + softmax_numerators(sr, kBlock, sc, m, e.data());
            mx[r] = m;
            round_row(e.data(), kBlock, p.data() + r * kBlock);
            if (keep != 1.f)
              for (float *a = acc.data() + r * D, *end = a + D; a < end; ++a) *a *= keep;
          }
          product(kBlock, D, p.data(), kBlock, vp.data() + j * kBlock * D, P * D, 16 * P, kBlock / P, acc.data(), D, true);
        }
        for (int64_t r = 0; r < kBlock && i * kBlock + r < T; ++r) {
          const int64_t t = i * kBlock + r;
          // A row that may see nothing gets zeros, as torch's kernel gives, and lse +inf: the
          // backward's exp(score - lse) is then 0 for it
          const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
          for (int64_t d = 0; d < D; ++d) acc[r * D + d] *= inv;
          round_row(acc.data() + r * D, D, o + ((b * T + t) * H + h) * D);
          l[(b * H + h) * T + t] = sum[r] > 0.f ? mx[r] + std::log(sum[r]) : kInf;
        }
      }
    }
  });
}

template <typename E>
void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
              const at::Tensor& lse, const Visible& vis, float sc, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  constexpr int64_t P = kPair<E>;
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1), G = H / K;
  const int64_t Tp = padded(T), blocks = Tp / kBlock, n = Tp * D;
  E *dqp = data<E>(dq), *dkp = data<E>(dk), *dvp = data<E>(dv);
  const float* lsep = lse.data_ptr<float>();
  at::parallel_for(0, B * K, 1, [&](int64_t t0, int64_t t1) {
    // per query head of the group: rows and pairs of q and grad_out, fp32 dq, the rows' lse and
    // sum(grad_out * out); once for the key/value head: k as tiles and pairs, v as tiles
    std::vector<E> qr(G * n), qp(G * n), gr(G * n), gp(G * n), kr(n), kt(n), kp(n), vr(n), vt(n);
    std::vector<float> dqa(G * n), ls(G * Tp), dd(G * Tp);
    std::vector<float> s(kBlock * kBlock), dp(kBlock * kBlock), dka(kBlock * D), dva(kBlock * D);
    std::vector<E> p(kBlock * kBlock), pt(kBlock * kBlock), ds(kBlock * kBlock), dst(kBlock * kBlock);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / K, g = task % K;
      pack_rows(slice<E>(k, b, g), T, Tp, D, kr.data());
      pack_tiles(kr.data(), Tp, D, kt.data());
      pack_pairs(kr.data(), Tp, D, kp.data());
      pack_rows(slice<E>(v, b, g), T, Tp, D, vr.data());
      pack_tiles(vr.data(), Tp, D, vt.data());
      for (int64_t e = 0; e < G; ++e) {
        const int64_t h = g * G + e;
        pack_rows(slice<E>(q, b, h), T, Tp, D, qr.data() + e * n);
        pack_pairs(qr.data() + e * n, Tp, D, qp.data() + e * n);
        pack_rows(slice<E>(dout, b, h), T, Tp, D, gr.data() + e * n);
        pack_pairs(gr.data() + e * n, Tp, D, gp.data() + e * n);
        const Rows<E> o = slice<E>(out, b, h);
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
          for (int64_t i = 0; i < blocks; ++i) {
            const int64_t h = g * G + e;
            const uint8_t state = vis.at(b, h, i, j);
            if (state == kNone) continue;
            const int64_t at_i = e * n + i * kBlock * D, at_j = j * kBlock * D;
            product(kBlock, kBlock, qr.data() + at_i, D, kt.data() + at_j, 16 * P, D * 16, D / P, s.data(), kBlock, false);
            product(kBlock, kBlock, gr.data() + at_i, D, vt.data() + at_j, 16 * P, D * 16, D / P, dp.data(), kBlock, false);
            for (int64_t r = 0; r < kBlock; ++r) {
              const int64_t t = i * kBlock + r;
              float* sr = s.data() + r * kBlock;  // becomes P, then dS, in fp32
              if (state == kSome) vis.hide(b, h, t, j, sr);
              softmax_numerators(sr, kBlock, sc, ls[e * Tp + t], sr);
              round_row(sr, kBlock, p.data() + r * kBlock);
              const float* dpr = dp.data() + r * kBlock;
              const float di = dd[e * Tp + t];
              for (int64_t c = 0; c < kBlock; ++c) sr[c] = sr[c] * (dpr[c] - di) * sc;
              round_row(sr, kBlock, ds.data() + r * kBlock);
            }
            transpose_block(p.data(), pt.data());
            transpose_block(ds.data(), dst.data());
            product(kBlock, D, pt.data(), kBlock, gp.data() + at_i, P * D, 16 * P, kBlock / P, dva.data(), D, true);
            product(kBlock, D, dst.data(), kBlock, qp.data() + at_i, P * D, 16 * P, kBlock / P, dka.data(), D, true);
            product(kBlock, D, ds.data(), kBlock, kp.data() + at_j, P * D, 16 * P, kBlock / P, dqa.data() + at_i, D, true);
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
}

}  // namespace

namespace chatforge_native {

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const c10::optional<at::Tensor>& mask, double scale) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "causal_attention: q is ", dt, "; the kernel takes bf16 or fp32");
  check(q, "q", dt), check(k, "k", dt), check(v, "v", dt);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(2) == T && k.size(3) == D && H % K == 0,
              "causal_attention: q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(), " do not match");
  auto out = at::empty({B, T, H, D}, q.options());
  auto lse = at::empty({B, H, T}, q.options().dtype(at::kFloat));
  const Visible vis(mask, B, H, T);
  if (dt == at::kFloat) forward<float>(q, k, v, vis, static_cast<float>(scale), out, lse);
  else forward<bf16>(q, k, v, vis, static_cast<float>(scale), out, lse);
  return {out.permute({0, 2, 1, 3}), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                                                    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                                    const c10::optional<at::Tensor>& mask, double scale) {
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kFloat, "causal_attention backward: q is ", dt, "; the kernel takes bf16 or fp32");
  check(dout, "grad_out", dt), check(q, "q", dt), check(k, "k", dt), check(v, "v", dt), check(out, "out", dt);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), K = k.size(1);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && k.sizes() == v.sizes() && H % K == 0 &&
                  lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.numel() == B * H * T,
              "causal_attention backward: shapes do not match");
  auto dq = at::empty({B, T, H, D}, q.options()), dk = at::empty({B, T, K, D}, q.options()), dv = at::empty({B, T, K, D}, q.options());
  const Visible vis(mask, B, H, T);
  if (dt == at::kFloat) backward<float>(dout, q, k, v, out, lse, vis, static_cast<float>(scale), dq, dk, dv);
  else backward<bf16>(dout, q, k, v, out, lse, vis, static_cast<float>(scale), dq, dk, dv);
  return {dq.permute({0, 2, 1, 3}), dk.permute({0, 2, 1, 3}), dv.permute({0, 2, 1, 3})};
}

// Which of the kernel's products run on vector instructions here: bit 1, bf16 on vdpbf16ps; bit 2,
// fp32 on AVX2 or AVX-512 multiply-adds. The others run on a plain loop (correct, slow).
int64_t causal_attention_native() {
  int64_t paths = 0;
#if defined(__AVX512BF16__)
  paths |= 1;
#endif
  if (Simd::kLanes > 1) paths |= 2;
  return paths;
}

}  // namespace chatforge_native

TORCH_LIBRARY_FRAGMENT(chatforge_native, m) {
  m.def("causal_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> (Tensor, Tensor)");
  m.def("causal_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? mask, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("causal_attention_native() -> int", &chatforge_native::causal_attention_native);
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) {
  m.impl("causal_attention_fwd", &chatforge_native::causal_attention_fwd);
  m.impl("causal_attention_bwd", &chatforge_native::causal_attention_bwd);
}
