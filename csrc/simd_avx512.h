// Simd<T> for AVX-512F (512-bit registers, 32 of them).
// Micro-tile: MR = 8 rows x NV = 3 registers of columns, 24 accumulators.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace tileattn {
namespace avx512 {

template <typename T> struct Simd;

template <> struct Simd<float> {
  using scalar = float;
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 8;
  static constexpr int NV = 3;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_load_ps(p); }
  static reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg a) { _mm512_store_ps(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg fnmadd(reg a, reg b, reg c) { return _mm512_fnmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_ps(a, b); }
  static float hmax(reg a) { return _mm512_reduce_max_ps(a); }
  static float first(reg a) { return _mm512_cvtss_f32(a); }
  static float hsum(reg a) {
    // A fixed pairwise order (the reduce intrinsic's order is unspecified).
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // dst[c][r] = src[r][c] for a W x W tile (src row stride ld, dst rows of W).
  static void transpose_tile(const float* src, int64_t ld, float* dst) {
    for (int r = 0; r < W; ++r)
      for (int c = 0; c < W; ++c) dst[c * W + r] = src[r * ld + c];
  }
  static constexpr float round_magic() { return 12582912.0f; }
  static reg scale_by_pow2(reg p, reg t) {
    const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t),
                                       _mm512_castps_si512(set1(round_magic())));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  }
  static reg zero_where_less(reg x, reg limit, reg value) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, limit, _CMP_NLT_UQ), value);
  }
  // Lanes of `keep` where p == 0, of `value` elsewhere.
  static reg keep_where_zero(reg p, reg keep, reg value) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(p, zero(), _CMP_EQ_OQ), value, keep);
  }
};

template <> struct Simd<double> {
  using scalar = double;
  using reg = __m512d;
  static constexpr int W = 8;
  static constexpr int MR = 8;
  static constexpr int NV = 3;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(double x) { return _mm512_set1_pd(x); }
  static reg load(const double* p) { return _mm512_load_pd(p); }
  static reg loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, reg a) { _mm512_store_pd(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static reg fnmadd(reg a, reg b, reg c) { return _mm512_fnmadd_pd(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_pd(a, b); }
  static reg min(reg a, reg b) { return _mm512_min_pd(a, b); }
  static double hmax(reg a) { return _mm512_reduce_max_pd(a); }
  static double first(reg a) { return _mm512_cvtsd_f64(a); }
  static double hsum(reg a) {
    __m256d s4 = _mm256_add_pd(_mm512_castpd512_pd256(a), _mm512_extractf64x4_pd(a, 1));
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(s4), _mm256_extractf128_pd(s4, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
  static void transpose_tile(const double* src, int64_t ld, double* dst) {
    for (int r = 0; r < W; ++r)
      for (int c = 0; c < W; ++c) dst[c * W + r] = src[r * ld + c];
  }
  static constexpr double round_magic() { return 6755399441055744.0; }
  static reg scale_by_pow2(reg p, reg t) {
    const __m512i n = _mm512_sub_epi64(_mm512_castpd_si512(t),
                                       _mm512_castpd_si512(set1(round_magic())));
    const __m512i bits = _mm512_slli_epi64(_mm512_add_epi64(n, _mm512_set1_epi64(1023)), 52);
    return _mm512_mul_pd(p, _mm512_castsi512_pd(bits));
  }
  static reg zero_where_less(reg x, reg limit, reg value) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(x, limit, _CMP_NLT_UQ), value);
  }
  static reg keep_where_zero(reg p, reg keep, reg value) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(p, zero(), _CMP_EQ_OQ), value, keep);
  }
};

}  // namespace avx512
}  // namespace tileattn
