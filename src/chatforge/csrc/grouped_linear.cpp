// x @ W.T for weights stored in groups of 32 with fp32 activations, sums and outputs: the decode
// steps' matmuls on int4 and int8 copies (chatforge/quantize.py says why).
//
// q4_linear: w = q * scale + min, q in 0..15. Per output row, for group g, 16 bytes whose low
// nibbles are q of inputs 32g..32g+15 and high nibbles q of inputs 32g+16..32g+31; scale and
// minimum as fp16 pairs (N, K/32, 2).
// q8_linear: w = q * scale, q in -127..127 (int8, (N, K)), one fp16 scale per group (N, K/32).
// f16_linear: w in fp16 (N, K), K a multiple of 32 (fp16 decode copies: exact conversion to fp32).
//
// Each weight is made in fp32 once per call (exactly, so the sums are those of an fp32 matmul on
// the same weights up to their order) and multiplied into every row of x, so a call of a few rows
// reads the weights once; a single row on int4 takes q4_one_row's shorter sum instead, or, where
// the CPU has them, integer dot products of the codes with x split into pieces (q4_row_vnni:
// AVX-512 VNNI, three bytes per input; q4_row_avx2: AVX2, two int16s; sums as close to exact as
// the fp32 ones). Making the weights from their codes is most of the time, so it is written for
// AVX-512 and AVX2 (the build is -march=native), with a plain loop for other CPUs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "ops.h"
#include "simd.h"

namespace {

using chatforge_simd::Simd;

constexpr int64_t kGroup = 32;
constexpr int64_t kMaxRows = 8;  // rows per pass over the weights (more rows: another pass)

struct Q4 {
  static constexpr int64_t kBytes = kGroup / 2, kScales = 2;  // fp16 scale and minimum
  static void codes(const uint8_t* b, Simd::V* d) { Simd::q4(b, d); }
};

struct Q8 {
  static constexpr int64_t kBytes = kGroup, kScales = 1;
  static void codes(const uint8_t* b, Simd::V* d) { Simd::q8(b, d); }
};

struct F16 {  // plain fp16 weights: no scales
  static constexpr int64_t kBytes = kGroup * 2, kScales = 0;
  static void codes(const uint8_t* b, Simd::V* d) { Simd::f16(reinterpret_cast<const c10::Half*>(b), d); }
};

// One row of x on int4 weights (a single stream's decode step): per group, scale * (sum of q x)
// + minimum * (sum of x), the second a dot product of the (scale, minimum) pairs with (0, group
// sum of x) after the loop. That is one multiply-add per vector fewer than making each weight
// first (AVX-512: 3 instead of 4 per group; AVX2: 5 instead of 8), where the weights' making is
// not shared by other rows. Its sums round differently from rows_times_weights' (below; both are
// fp32 sums of the same weights). (The int8 output layer gained nothing so: it waits on memory.)
void q4_one_row(const float* x, int64_t K, const uint8_t* w, const c10::Half* sm, float* y, int64_t n0, int64_t n1) {
  constexpr int P = kGroup / Simd::kLanes;
  const int64_t G = K / kGroup;
  std::vector<float> s(G * 2), z(G * 2, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    Simd::V t = Simd::load(x + g * kGroup);
    for (int p = 1; p < P; ++p) t = Simd::add(t, Simd::load(x + g * kGroup + p * Simd::kLanes));
    z[g * 2 + 1] = Simd::sum(t);
  }
  const auto group = [&](const uint8_t* wn, int64_t g) {  // sum of q x over group g, as a vector
    Simd::V q[P];
    Q4::codes(wn + g * Q4::kBytes, q);
    const float* xg = x + g * kGroup;
    Simd::V t = Simd::mul(q[P - 1], Simd::load(xg + (P - 1) * Simd::kLanes));
    for (int p = P - 2; p >= 0; --p) t = Simd::fmadd(q[p], Simd::load(xg + p * Simd::kLanes), t);
    return t;
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * G * Q4::kBytes;
    Simd::halves(sm + n * G * 2, G * 2, s.data());
    Simd::V a = Simd::zero(), b = Simd::zero();  // two chains: the multiply-adds' latency
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
      a = Simd::fmadd(group(wn, g), Simd::set1(s[g * 2]), a);
      b = Simd::fmadd(group(wn, g + 1), Simd::set1(s[g * 2 + 2]), b);
    }
    if (g < G) a = Simd::fmadd(group(wn, g), Simd::set1(s[g * 2]), a);
    y[n] = Simd::sum(Simd::add(a, b)) + chatforge_simd::dot(s.data(), z.data(), G * 2);
  }
}

// Single rows on int4 take integer dot products where the CPU has them: q4_row_vnni (AVX-512 VNNI)
// or q4_row_avx2 (AVX2 without AVX-512); elsewhere q4_one_row
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CHATFORGE_Q4_ROW_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
#define CHATFORGE_Q4_ROW_AVX2 1
#endif
#if defined(CHATFORGE_Q4_ROW_VNNI) || defined(CHATFORGE_Q4_ROW_AVX2)
std::atomic<bool> integer_rows{true};  // off: single rows on q4_one_row (q4_integer_rows: tests, ablations)
// A group whose largest |x| is below kTiny but not 0 would put the pieces' scale outside fp32's
// normal range: such a row, or one not finite, takes q4_one_row instead.
constexpr float kTiny = 0x1p-100f;
#endif

#if defined(CHATFORGE_Q4_ROW_VNNI)
// One row of x on int4 weights with integer dot products (vpdpbusd: 4 products of unsigned by
// signed bytes per 32-bit lane). Making fp32 weights from the codes bound q4_one_row (~8 vector
// ops per group of 32); here a group takes ~4 and the kernel waits on memory instead.
// x goes in as three signed bytes per input, x ~ d (q1 + q2 / 256 + q3 / 32768) with d = max|x| /
// 127 over its group of 32, so a sum is exact in 32 bits (|S| < 2.006e9 at the extremes) and x is
// held to d / 65536 (2^-23 of its group's largest |x|; fp32 holds each input to 2^-24 of itself);
// the minimums' share uses the groups' fp32 sums of x.
constexpr int64_t kPieces = 3, kPieceBytes = 2 * kPieces * 64;  // per 4 groups: low-nibble and high-nibble halves
constexpr float kPieceScale = 32768.f;  // q1's weight in S

// lane 4k + m of the result: the sum of chunk k (lanes 4k..4k+3) of v[m]. With v[m] holding groups
// 4m..4m+3 of a block of 16 in 4 lanes each, lane L ends up with group kLaneGroup[L].
inline __m512i quad_sums(const __m512i* v) {
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
  const __m512i t2 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(t1, t2), _mm512_unpackhi_epi64(t1, t2));
}
constexpr int kLaneGroup[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};  // its own inverse

// The integer sums of 4 groups' codes c (64 bytes, the groups' missing ones zero) times x's pieces
// xq (their 6 vectors; m15 is 15 in every byte): lanes 4m..4m+3 hold group m's sum in 4 parts,
// exact in 32 bits
__attribute__((always_inline)) inline __m512i piece_sums(const __m512i c, const __m512i* xq, const __m512i m15) {
  const __m512i lo = _mm512_and_si512(c, m15), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), m15);
  __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xq[0]), hi, xq[1]);
  s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(s, 8), lo, xq[2]), hi, xq[3]);
  return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(s, 7), lo, xq[4]), hi, xq[5]);
}
inline __mmask64 groups_mask(int64_t ng) { return ng == 4 ? ~0ULL : (1ULL << (ng * 16)) - 1; }  // ng of 4 groups' 16 bytes

struct XPieces {  // one row of x, made once per call and shared by the threads
  int64_t G;
  bool usable = true;
  std::vector<int8_t> q;     // per 4 groups, 64 bytes each: piece 1 of the groups' first halves, of their second halves, piece 2, ...
  std::vector<float> d, z;   // per block of 16 groups in kLaneGroup order: d / kPieceScale, sum of x
  // A last block of at most 8 groups (576 inputs: 16 + 2) skips the block's transpose: its groups'
  // sums stay spread over 4 lanes each, scaled by d repeated over the lanes, z in each group's first lane
  int64_t full = G / 16 * 16;
  bool short_tail = G % 16 != 0 && G % 16 <= 8;
  std::vector<float> dt, zt;
  // the pieces of groups g..g+3 (g a multiple of 4): 6 vectors
  __attribute__((always_inline)) void pieces(int64_t g, __m512i* xq) const {
    for (int k = 0; k < 2 * kPieces; ++k) xq[k] = _mm512_loadu_si512(q.data() + g / 4 * kPieceBytes + k * 64);
  }
  XPieces(const float* x, int64_t G_)
      : G(G_), q((G_ + 3) / 4 * kPieceBytes, 0), d((G_ + 15) / 16 * 16, 0.f), z(d.size(), 0.f), dt(32, 0.f), zt(32, 0.f) {
    const __m512 k127 = _mm512_set1_ps(127.f), m127 = _mm512_set1_ps(-127.f);
    const auto round = [](__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); };
    for (int64_t g = 0; g < G; ++g) {
      const __m512 a = _mm512_loadu_ps(x + g * kGroup), b = _mm512_loadu_ps(x + g * kGroup + 16);
      const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
      const int64_t lane = g / 16 * 16 + kLaneGroup[g % 16];
      z[lane] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
      if (!std::isfinite(z[lane]) || (m != 0.f && m < kTiny)) {
        usable = false;
        return;
      }
      d[lane] = m / 127.f / kPieceScale;
      if (short_tail && g >= full) {
        for (int i = 0; i < 4; ++i) dt[(g - full) * 4 + i] = d[lane];
        zt[(g - full) * 4] = z[lane];
      }
      const __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
      int8_t* qg = q.data() + g / 4 * kPieceBytes + g % 4 * 16;
      for (int h = 0; h < 2; ++h) {  // r1 - t and the scalings by 256 and 128 are exact
        const __m512 t = _mm512_mul_ps(h ? b : a, inv), r1 = round(t);
        const __m512 t2 = _mm512_mul_ps(_mm512_sub_ps(t, r1), _mm512_set1_ps(256.f));
        const __m512 r2 = _mm512_max_ps(_mm512_min_ps(round(t2), k127), m127);
        const __m512 r3 = _mm512_max_ps(_mm512_min_ps(round(_mm512_mul_ps(_mm512_sub_ps(t2, r2), _mm512_set1_ps(128.f))), k127), m127);
        const __m512 r[kPieces] = {r1, r2, r3};
        for (int k = 0; k < kPieces; ++k)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + (2 * k + h) * 64), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r[k])));
      }
    }
  }
};

// y[n] for n in [n0, n1): NB output rows at a time share the loads of x's pieces; per block of
// 16 groups, 4 loads of 4 groups' codes, their integer sums (lanes of 4 products), one vector of
// the 16 groups' sums, scaled in fp32
template <int NB>
void q4_row_vnni(const XPieces& xp, const uint8_t* w, const c10::Half* sm, float* y, int64_t n0, int64_t n1) {
  const int64_t G = xp.G;
  const __m512i m15 = _mm512_set1_epi8(15);
  alignas(64) int32_t is[16], im[16];  // (scale, minimum) pairs of 16 groups to kLaneGroup order
  for (int l = 0; l < 16; ++l) is[l] = 2 * kLaneGroup[l], im[l] = 2 * kLaneGroup[l] + 1;
  const __m512i scales = _mm512_load_si512(is), mins = _mm512_load_si512(im);
  // a short tail's lane 4m + i takes group m's (scale, minimum), entries 2m and 2m + 1 of its pairs
  const __m512i tail_scales = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  const __m512i tail_mins = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    // the rows a few KB on, into L2: the hardware's prefetch alone left the kernel ~20% slower
    for (int64_t i = 0; i < NB * G * 16; i += 64) _mm_prefetch(reinterpret_cast<const char*>(w + n * G * 16 + 4096 + i), _MM_HINT_T1);
    for (int64_t i = 0; i < NB * G * 4; i += 64) _mm_prefetch(reinterpret_cast<const char*>(sm + n * G * 2) + 1024 + i, _MM_HINT_T1);
    __m512 acc[NB];
    for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < (xp.short_tail ? xp.full : G); g0 += 16) {
      __m512i v[NB][4];
      for (int j = 0; j < 4; ++j) {
        const int64_t gj = g0 + 4 * j, ng = std::min<int64_t>(4, G - gj);
        if (ng <= 0) {
          for (int r = 0; r < NB; ++r) v[r][j] = _mm512_setzero_si512();
          continue;
        }
        __m512i xq[2 * kPieces];
        xp.pieces(gj, xq);
        const __mmask64 mk = groups_mask(ng);
        for (int r = 0; r < NB; ++r) v[r][j] = piece_sums(_mm512_maskz_loadu_epi8(mk, w + ((n + r) * G + gj) * 16), xq, m15);
      }
      const __m512 d = _mm512_loadu_ps(xp.d.data() + g0), z = _mm512_loadu_ps(xp.z.data() + g0);
      const __mmask16 mg = static_cast<__mmask16>((1u << std::min<int64_t>(16, G - g0)) - 1);
      for (int r = 0; r < NB; ++r) {
        const __m512i pairs = _mm512_maskz_loadu_epi32(mg, sm + ((n + r) * G + g0) * 2);
        const __m512 p0 = _mm512_cvtph_ps(_mm512_castsi512_si256(pairs)), p1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(pairs, 1));
        const __m512 sd = _mm512_mul_ps(_mm512_permutex2var_ps(p0, scales, p1), d);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(quad_sums(v[r])), sd, _mm512_fmadd_ps(_mm512_permutex2var_ps(p0, mins, p1), z, acc[r]));
      }
    }
    if (xp.short_tail)
      for (int64_t gj = xp.full; gj < G; gj += 4) {  // chunks of 4 groups, lanes 4m..4m+3 for group gj + m
        const int64_t ng = std::min<int64_t>(4, G - gj);
        __m512i xq[2 * kPieces];
        xp.pieces(gj, xq);
        const __m512 d = _mm512_loadu_ps(xp.dt.data() + (gj - xp.full) * 4), z = _mm512_loadu_ps(xp.zt.data() + (gj - xp.full) * 4);
        const __mmask64 mk = groups_mask(ng);
        for (int r = 0; r < NB; ++r) {
          const __m512i s = piece_sums(_mm512_maskz_loadu_epi8(mk, w + ((n + r) * G + gj) * 16), xq, m15);
          const __m512 p = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (2 * ng)) - 1), sm + ((n + r) * G + gj) * 2));
          const __m512 sd = _mm512_mul_ps(_mm512_permutexvar_ps(tail_scales, p), d);
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sd, _mm512_fmadd_ps(_mm512_permutexvar_ps(tail_mins, p), z, acc[r]));
        }
      }
    for (int r = 0; r < NB; ++r) y[n + r] = _mm512_reduce_add_ps(acc[r]);
  }
  if constexpr (NB > 1)
    if (n < n1) q4_row_vnni<1>(xp, w, sm, y, n, n1);
}
#elif defined(CHATFORGE_Q4_ROW_AVX2)
// One row of x on int4 weights on AVX2: x in two int16 pieces per input, x ~ d (q1 + q2 / 65534)
// with d = max|x| / 32767 over its group of 32 (each input held to 2^-31 of the group's largest
// |x|); vpmaddwd multiplies the codes (widened to 16 bits) by them two to a 32-bit lane (the sums
// stay below 2^24, so they are exact in fp32 too), the pieces meet in fp32, and each group's 8
// lanes go into the row's accumulator times the group's scale * d: no per-group reduction.
// Hot, ~20% fewer cycles per group than q4_one_row; cold, 3-10% less time (emulated AVX2;
// benchmarks/README.md). Prefetching rows ahead, as q4_row_vnni does, made it slower there.
struct XPieces {  // one row of x, made once per call and shared by the threads
  int64_t G;
  bool usable = true;
  std::vector<int16_t> q;  // per group, 16 each: q1 of inputs 0-15 (the codes' low nibbles), of 16-31, q2 of 0-15, of 16-31
  std::vector<float> d, z;  // per group: d; (0, sum of x) pairs, to dot with the (scale, minimum) pairs
  XPieces(const float* x, int64_t G_) : G(G_), q(G_ * 64), d(G_), z(G_ * 2, 0.f) {
    const auto round = [](__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); };
    const auto int16s = [](__m256 a) {  // 8 whole floats in int16 range to int16
      const __m256i i = _mm256_cvtps_epi32(a);
      return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    };
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + g * kGroup;
      __m256 v[4], mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      const __m256 sign = _mm256_set1_ps(-0.f);
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(xg + 8 * j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        sum = _mm256_add_ps(sum, v[j]);
      }
      alignas(32) float m8[8];
      _mm256_store_ps(m8, mx);
      float m = 0.f;
      for (const float a : m8) m = std::max(m, a);
      z[g * 2 + 1] = Simd::sum(sum);
      if (!std::isfinite(z[g * 2 + 1]) || (m != 0.f && m < kTiny)) {
        usable = false;
        return;
      }
      d[g] = m / 32767.f;
      const __m256 inv = _mm256_set1_ps(m > 0.f ? 32767.f / m : 0.f);
      for (int j = 0; j < 4; ++j) {  // inputs 8j..8j+7
        const __m256 t = _mm256_mul_ps(v[j], inv), r1 = round(t);
        const __m256 r2 = round(_mm256_mul_ps(_mm256_sub_ps(t, r1), _mm256_set1_ps(65534.f)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + g * 64 + 8 * j), int16s(r1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.data() + g * 64 + 32 + 8 * j), int16s(r2));
      }
    }
  }
};

void q4_row_avx2(const XPieces& xp, const uint8_t* w, const c10::Half* sm, float* y, int64_t n0, int64_t n1) {
  const int64_t G = xp.G;
  std::vector<float> s(G * 2), sd(G);
  const __m256i m15 = _mm256_set1_epi16(15);
  const auto group = [&](const uint8_t* wn, int64_t g) {  // sum of q x / d over group g, in 8 lanes
    const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + g * 16)));
    const __m256i lo = _mm256_and_si256(c, m15), hi = _mm256_srli_epi16(c, 4);
    const __m256i* qx = reinterpret_cast<const __m256i*>(xp.q.data() + g * 64);
    const __m256i s1 = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(qx)), _mm256_madd_epi16(hi, _mm256_loadu_si256(qx + 1)));
    const __m256i s2 = _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(qx + 2)), _mm256_madd_epi16(hi, _mm256_loadu_si256(qx + 3)));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), _mm256_set1_ps(1.f / 65534.f), _mm256_cvtepi32_ps(s1));
  };
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * G * 16;
    Simd::halves(sm + n * G * 2, G * 2, s.data());
    for (int64_t g = 0; g < G; ++g) sd[g] = s[g * 2] * xp.d[g];
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();  // two chains: the multiply-adds' latency
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) {
      a = _mm256_fmadd_ps(group(wn, g), _mm256_set1_ps(sd[g]), a);
      b = _mm256_fmadd_ps(group(wn, g + 1), _mm256_set1_ps(sd[g + 1]), b);
    }
    if (g < G) a = _mm256_fmadd_ps(group(wn, g), _mm256_set1_ps(sd[g]), a);
    y[n] = Simd::sum(_mm256_add_ps(a, b)) + chatforge_simd::dot(s.data(), xp.z.data(), G * 2);
  }
}
#endif

// y[r, n] for R >= 6 rows of x on int4 weights, on AVX-512: as rows_times_weights (below), but NB
// = 2 output rows at a time share each load of x, one accumulator per (row of x, output row). The
// loads were what bound it where R rows of x outgrow the first-level cache (8 rows of 1,536
// inputs: 48 KB; measured 1.3-1.5x there, 1.02-1.05x at 576 inputs; with fewer rows, and on the
// int8 output layer, it was no faster or slower). A row's sums do not depend on NB, so neither on
// how threads split the rows.
template <int R, int NB>
void q4_rows_pairs(const float* x, int64_t K, const uint8_t* w, const c10::Half* sm, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int P = kGroup / Simd::kLanes;
  const int64_t G = K / kGroup;
  std::vector<float> s(NB * G * 2);
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) {
    Simd::halves(sm + n * G * 2, NB * G * 2, s.data());
    Simd::V acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) acc[r][j] = Simd::zero();
    for (int64_t g = 0; g < G; ++g) {
      Simd::V q[NB][P];
      for (int j = 0; j < NB; ++j) {
        Q4::codes(w + ((n + j) * G + g) * Q4::kBytes, q[j]);
        const float* sj = s.data() + (j * G + g) * 2;
        for (int p = 0; p < P; ++p) q[j][p] = Simd::fmadd(q[j][p], Simd::set1(sj[0]), Simd::set1(sj[1]));
      }
      for (int r = 0; r < R; ++r) {
        const float* xg = x + r * K + g * kGroup;
        for (int p = 0; p < P; ++p) {
          const Simd::V xv = Simd::load(xg + p * Simd::kLanes);
          for (int j = 0; j < NB; ++j) acc[r][j] = Simd::fmadd(q[j][p], xv, acc[r][j]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NB; ++j) y[r * N + n + j] = Simd::sum(acc[r][j]);
  }
  if constexpr (NB > 1)
    if (n < n1) q4_rows_pairs<R, 1>(x, K, w, sm, y, N, n, n1);
}

// y[r, n] for n in [n0, n1) and R rows of x: each group's weights are made in fp32 (exactly: a
// small integer times an fp16 scale, plus an fp16 minimum for q4; or an fp16 weight) and
// multiplied into every row
template <typename F, int R>
void rows_times_weights(const float* x, int64_t K, const uint8_t* w, const c10::Half* sm, float* y,
                        int64_t N, int64_t n0, int64_t n1) {
  if constexpr (R == 1 && F::kScales == 2) return q4_one_row(x, K, w, sm, y, n0, n1);
  if constexpr (R >= 6 && F::kScales == 2 && Simd::kLanes == 16) return q4_rows_pairs<R, 2>(x, K, w, sm, y, N, n0, n1);
  constexpr int P = kGroup / Simd::kLanes;  // vectors per group
  const int64_t G = K / kGroup;
  std::vector<float> s(G * F::kScales);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wn = w + n * G * F::kBytes;
    if constexpr (F::kScales > 0) Simd::halves(sm + n * G * F::kScales, G * F::kScales, s.data());
    // accumulators per row of x: one per vector of a group where they and the group's weights fit in
    // the registers, else 2 or 1 (AVX2's 16 registers held 8 rows x 4 only by spilling: 1.4x slower
    // at 8-16 rows; 2 per row measured fastest at 3-5 rows)
    constexpr int PA = R * P + P <= Simd::kRegs - 2 ? P : (R * 2 + P <= Simd::kRegs - 2 ? 2 : 1);
    Simd::V acc[R][PA];
    for (int r = 0; r < R; ++r)
      for (int p = 0; p < PA; ++p) acc[r][p] = Simd::zero();
    for (int64_t g = 0; g < G; ++g) {
      Simd::V q[P];
      F::codes(wn + g * F::kBytes, q);
      if constexpr (F::kScales == 2) {
        const Simd::V scale = Simd::set1(s[g * 2]), lo = Simd::set1(s[g * 2 + 1]);
        for (int p = 0; p < P; ++p) q[p] = Simd::fmadd(q[p], scale, lo);
      } else if constexpr (F::kScales == 1) {
        const Simd::V scale = Simd::set1(s[g]);
        for (int p = 0; p < P; ++p) q[p] = Simd::mul(q[p], scale);
      }
      for (int r = 0; r < R; ++r) {
        const float* xg = x + r * K + g * kGroup;
        for (int p = 0; p < P; ++p) acc[r][p % PA] = Simd::fmadd(q[p], Simd::load(xg + p * Simd::kLanes), acc[r][p % PA]);
      }
    }
    for (int r = 0; r < R; ++r) {
      Simd::V t = acc[r][0];
      for (int p = 1; p < PA; ++p) t = Simd::add(t, acc[r][p]);
      y[r * N + n] = Simd::sum(t);
    }
  }
}

using Kernel = void (*)(const float*, int64_t, const uint8_t*, const c10::Half*, float*, int64_t, int64_t, int64_t);
template <typename F>
constexpr Kernel kKernels[kMaxRows] = {rows_times_weights<F, 1>, rows_times_weights<F, 2>, rows_times_weights<F, 3>,
                                       rows_times_weights<F, 4>, rows_times_weights<F, 5>, rows_times_weights<F, 6>,
                                       rows_times_weights<F, 7>, rows_times_weights<F, 8>};

// y (M, N) = x (M, K) @ W.T, output rows split between threads; rows of x in passes of kMaxRows
// over ~16 KB of weights at a time (still in cache for the next pass)
template <typename F>
void run(const float* xp, int64_t M, int64_t K, const uint8_t* wp, const c10::Half* sp, int64_t N, float* yp) {
  const int64_t G = K / kGroup, step = std::max<int64_t>(1, 16384 / (G * F::kBytes));
#if defined(CHATFORGE_Q4_ROW_VNNI) || defined(CHATFORGE_Q4_ROW_AVX2)
  if constexpr (F::kScales == 2)
    if (M == 1 && integer_rows.load(std::memory_order_relaxed)) {
      const XPieces x1(xp, G);
      if (x1.usable) {
        at::parallel_for(0, N, step, [&](int64_t n0, int64_t n1) {
#if defined(CHATFORGE_Q4_ROW_VNNI)
          q4_row_vnni<2>(x1, wp, sp, yp, n0, n1);
#else
          q4_row_avx2(x1, wp, sp, yp, n0, n1);
#endif
        });
        return;
      }
    }
#endif
  // grain: one such block, so two threads split even the smallest matrices
  at::parallel_for(0, N, step, [&](int64_t n0, int64_t n1) {
    for (int64_t b0 = n0; b0 < n1; b0 += step)
      for (int64_t r0 = 0; r0 < M; r0 += kMaxRows)
        kKernels<F>[std::min(kMaxRows, M - r0) - 1](xp + r0 * K, K, wp, sp, yp + r0 * N, N, b0, std::min(n1, b0 + step));
  });
}

template <typename F>
void check(const char* name, int64_t K, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kByte || w.scalar_type() == at::kChar || w.scalar_type() == at::kHalf) &&
                  w.is_contiguous(), name, ": w must be contiguous 2-D uint8/int8/fp16");
  const int64_t N = w.size(0), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0 && w.size(1) * static_cast<int64_t>(w.element_size()) * kGroup == K * F::kBytes, name, ": x has ", K,
              " inputs, w has ", w.size(1) * w.element_size(), " bytes per row");
  TORCH_CHECK(F::kScales == 0 || (scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == N * G * F::kScales),
              name, ": scales must be contiguous fp16, ", F::kScales, " per group of ", kGroup);
}

template <typename F>
at::Tensor grouped_linear(const char* name, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, name, ": x must be a 2-D fp32 tensor");
  check<F>(name, x.size(1), w, scales);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  run<F>(xc.data_ptr<float>(), x.size(0), x.size(1), static_cast<const uint8_t*>(w.data_ptr()),
         F::kScales ? scales.data_ptr<c10::Half>() : nullptr, w.size(0), y.data_ptr<float>());
  return y;
}

}  // namespace

namespace chatforge_native {

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales_mins) {
  return grouped_linear<Q4>("q4_linear", x, w, scales_mins);
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return grouped_linear<Q8>("q8_linear", x, w, scales);
}

at::Tensor f16_linear(const at::Tensor& x, const at::Tensor& w) { return grouped_linear<F16>("f16_linear", x, w, at::Tensor()); }

// Whether single rows on int4 take the integer kernel from now on (where the build has one; else
// it stays false); returns the setting before.
bool q4_integer_rows(bool on) {
#if defined(CHATFORGE_Q4_ROW_VNNI) || defined(CHATFORGE_Q4_ROW_AVX2)
  return integer_rows.exchange(on);
#else
  (void)on;
  return false;
#endif
}

void check_block_linear(const char* name, int64_t K, int64_t N, const at::Tensor& w, const at::Tensor& scales) {
  if (w.scalar_type() == at::kHalf)
    check<F16>(name, K, w, scales);
  else
    check<Q4>(name, K, w, scales);
  TORCH_CHECK(w.size(0) == N, name, ": ", N, " outputs expected, w has ", w.size(0));
}

void block_linear_into(const float* x, int64_t M, int64_t K, const at::Tensor& w, const at::Tensor& scales, float* y) {
  const uint8_t* wp = static_cast<const uint8_t*>(w.data_ptr());
  if (w.scalar_type() == at::kHalf)
    run<F16>(x, M, K, wp, nullptr, w.size(0), y);
  else
    run<Q4>(x, M, K, wp, scales.data_ptr<c10::Half>(), w.size(0), y);
}

}  // namespace chatforge_native

TORCH_LIBRARY(chatforge_native, m) {
  m.def("q4_linear(Tensor x, Tensor w, Tensor scales_mins) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("f16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q4_integer_rows(bool on) -> bool", &chatforge_native::q4_integer_rows);
}
TORCH_LIBRARY_IMPL(chatforge_native, CPU, m) {
  m.impl("q4_linear", &chatforge_native::q4_linear);
  m.impl("q8_linear", &chatforge_native::q8_linear);
  m.impl("f16_linear", &chatforge_native::f16_linear);
}
