// One fp32 vector type for the project's CPU kernels, chosen at build time (-march=native):
// AVX-512 (16 lanes), AVX2 with FMA and F16C (8 lanes), else one lane for the compiler to
// vectorize as it can. q4 / q8 / f16 turn one group of 32 codes or halves into fp32 vectors
// (grouped_linear.cpp gives their layouts); halves converts fp16 scales; sums reduces kLanes
// vectors to one vector of their sums; dot is a dot product of n floats.
#pragma once

#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

namespace chatforge_simd {

// exp(x) for x <= 0 (softmax scores less their maximum): x = n ln2 + r with |r| <= ln2 / 2, and
// exp(r) by its Taylor series to r^7 (relative error ~2e-8, below fp32's rounding); below
// kExpMin the result would leave fp32's normal range and is 0.
constexpr float kLog2e = 1.44269504f, kLn2Hi = 0.693145752f, kLn2Lo = 1.42860677e-6f, kExpMin = -87.0f;

template <typename S>
typename S::V exp_poly_of(typename S::V x, typename S::V n) {  // exp(x - n ln2), n an integer
  const typename S::V r = S::fmadd(n, S::set1(-kLn2Lo), S::fmadd(n, S::set1(-kLn2Hi), x));
  typename S::V p = S::set1(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = S::fmadd(p, r, S::set1(c));
  return p;
}

#if defined(__AVX512F__)
struct Simd {  // 16 fp32 lanes; a group is 2 vectors
  using V = __m512;
  static constexpr int kLanes = 16, kRegs = 32;  // kRegs: vector registers, for kernels that size their accumulators
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V a) { return _mm512_reduce_add_ps(a); }
  static V sums(const V* a) {  // lane j = sum(a[j]) for 16 vectors: a transpose-and-add tree
    V b[8], c[4];
    for (int i = 0; i < 8; ++i) b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per 128-bit chunk: partial sums of a[4i..4i+3]
      c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const V e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const V e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(e0, e1, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  static V exp(V x) {  // exp_poly_of above; 0 for x < kExpMin (-inf: a masked score)
    const __m512i n = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT));
    const V p = exp_poly_of<Simd>(x, _mm512_cvtepi32_ps(n));
    const V y = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(n, 23)));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(kExpMin), _CMP_GE_OQ), y);
  }
  static void q4(const uint8_t* b, V* d) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
#if defined(__AVX512VBMI__)
    // byte j to the low byte of lane j (the rest zeroed) in one permute, both nibbles taken from
    // it: one cross-lane op where two widenings took two (5-8% on the single-row kernel)
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i r = _mm512_maskz_permutexvar_epi8(0x1111111111111111ULL, lanes, _mm512_castsi128_si512(bytes));
    d[0] = _mm512_cvtepi32_ps(_mm512_and_si512(r, _mm512_set1_epi32(15)));
    d[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(r, 4));
#else
    const __m128i low = _mm_set1_epi8(15);
    d[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low)));
    d[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low)));
#endif
  }
  static void q8(const uint8_t* b, V* d) {
    d[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))));
    d[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16))));
  }
  static void f16(const c10::Half* h, V* d) {
    d[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    d[1] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + 16)));
  }
  static void halves(const c10::Half* h, int64_t n, float* f) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
    for (; i < n; ++i) f[i] = static_cast<float>(h[i]);
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Simd {  // 8 fp32 lanes; a group is 4 vectors
  using V = __m256;
  static constexpr int kLanes = 8, kRegs = 16;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static V sums(const V* a) {  // lane j = sum(a[j]) for 8 vectors
    const V c0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // per 128-bit half: a[0..3]
    const V c1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
  }
  static V exp(V x) {
    const V nf = _mm256_round_ps(_mm256_mul_ps(x, set1(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V p = exp_poly_of<Simd>(x, nf);
    const V y = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(nf), 23)));
    return _mm256_and_ps(y, _mm256_cmp_ps(x, set1(kExpMin), _CMP_GE_OQ));
  }
  static V u8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }  // the low 8 bytes
  static V i8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
  static void q4(const uint8_t* b, V* d) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), low = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    d[0] = u8(lo), d[1] = u8(_mm_srli_si128(lo, 8)), d[2] = u8(hi), d[3] = u8(_mm_srli_si128(hi, 8));
  }
  static void q8(const uint8_t* b, V* d) {
    const __m128i b0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
    const __m128i b1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16));
    d[0] = i8(b0), d[1] = i8(_mm_srli_si128(b0, 8)), d[2] = i8(b1), d[3] = i8(_mm_srli_si128(b1, 8));
  }
  static void f16(const c10::Half* h, V* d) {
    for (int j = 0; j < 4; ++j) d[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 8 * j)));
  }
  static void halves(const c10::Half* h, int64_t n, float* f) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
    for (; i < n; ++i) f[i] = static_cast<float>(h[i]);
  }
};
#else
struct Simd {  // one lane: the compiler vectorizes what it can
  using V = float;
  static constexpr int kLanes = 1, kRegs = 1 << 10;  // no limit to keep to
  static V zero() { return 0.f; }
  static V set1(float a) { return a; }
  static V load(const float* p) { return *p; }
  static V load(const c10::Half* p) { return static_cast<float>(*p); }
  static void store(float* p, V a) { *p = a; }
  static V mul(V a, V b) { return a * b; }
  static V add(V a, V b) { return a + b; }
  static V div(V a, V b) { return a / b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static float sum(V a) { return a; }
  static V sums(const V* a) { return a[0]; }
  static V exp(V x) { return x >= kExpMin ? std::exp(x) : 0.f; }
  static void q4(const uint8_t* b, V* d) {
    for (int j = 0; j < 16; ++j) d[j] = static_cast<float>(b[j] & 15), d[j + 16] = static_cast<float>(b[j] >> 4);
  }
  static void q8(const uint8_t* b, V* d) {
    for (int j = 0; j < 32; ++j) d[j] = static_cast<float>(reinterpret_cast<const int8_t*>(b)[j]);
  }
  static void f16(const c10::Half* h, V* d) {
    for (int j = 0; j < 32; ++j) d[j] = static_cast<float>(h[j]);
  }
  static void halves(const c10::Half* h, int64_t n, float* f) {
    for (int64_t i = 0; i < n; ++i) f[i] = static_cast<float>(h[i]);
  }
};
#endif

// p[i] = exp(s[i] * scale - top), 0 where that is below kExpMin (a -inf score: a masked one, or
// any score against top = +inf); returns their sum. p may be s.
inline float softmax_numerators(const float* s, int64_t n, float scale, float top, float* p) {
  const Simd::V sc = Simd::set1(scale), sh = Simd::set1(-top);
  Simd::V acc = Simd::zero();
  int64_t i = 0;
  for (; i + Simd::kLanes <= n; i += Simd::kLanes) {
    const Simd::V e = Simd::exp(Simd::fmadd(Simd::load(s + i), sc, sh));
    Simd::store(p + i, e);
    acc = Simd::add(acc, e);
  }
  float total = Simd::sum(acc);
  for (; i < n; ++i) {
    const float x = s[i] * scale - top;
    total += (p[i] = x >= kExpMin ? std::exp(x) : 0.f);
  }
  return total;
}

inline float dot(const float* a, const float* b, int64_t n) {  // sum of a[i] * b[i]
  Simd::V acc = Simd::zero();
  int64_t i = 0;
  for (; i + Simd::kLanes <= n; i += Simd::kLanes) acc = Simd::fmadd(Simd::load(a + i), Simd::load(b + i), acc);
  float s = Simd::sum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace chatforge_simd
