// Simd<T> for AVX-512F (512-bit registers, 32 of them).
// Micro-tile: MR = 8 rows x NV = 3 registers of columns, 24 accumulators.
#pragma once

#include <immintrin.h>

#include <cstdint>

// The namespace: avx512, or the avx512_bf16 path's own copy (its translation
// unit defines TILEATTN_SIMD512_NS; see kernel_avx512_bf16.cpp).
#ifndef TILEATTN_SIMD512_NS
#define TILEATTN_SIMD512_NS avx512
#endif

namespace tileattn {
namespace TILEATTN_SIMD512_NS {

template <typename T> struct Simd;

template <> struct Simd<float> {
  using scalar = float;
  using reg = __m512;
  static constexpr int W = 16;
  static constexpr int MR = 8;
  static constexpr int kRegisters = 32;  // vector registers the compiler can allocate
  static constexpr int NV = 3;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg load(const float* p) { return _mm512_load_ps(p); }
  static reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static reg loadu_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // W bfloat16 values widened (exactly: a shift into the high half).
  static reg loadu_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static void store(float* p, reg a) { _mm512_store_ps(p, a); }
  static void storeu(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
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
    reg r[16];
    for (int i = 0; i < 16; ++i) r[i] = loadu(src + i * ld);
    transpose_registers(r, dst);
  }
  // The same for a tile of IEEE binary16 values, widened as they are loaded.
  static constexpr bool kHalfTile = true;
  static void transpose_tile_half(const uint16_t* src, int64_t ld, float* dst) {
    reg r[16];
    for (int i = 0; i < 16; ++i)
      r[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * ld)));
    transpose_registers(r, dst);
  }
  static void transpose_tile_bf16(const uint16_t* src, int64_t ld, float* dst) {
    reg r[16];
    for (int i = 0; i < 16; ++i) r[i] = loadu_bf16(src + i * ld);
    transpose_registers(r, dst);
  }
  // 16 x 16 transpose in registers: pairs of rows interleaved within 128-bit
  // lanes (unpack), then groups of four rows (shuffle), then the 128-bit
  // lanes of four groups gathered (two rounds of shuffle_f32x4). Register
  // u[4g + c], lane L holds rows 4g..4g+3 of column 4L + c.
  static void transpose_registers(const reg* r, float* dst) {
    reg c[16];
    transpose_in_registers(r, c);
    for (int i = 0; i < 16; ++i) store(dst + i * W, c[i]);
  }
  static void transpose_in_registers(const reg* r, reg* col) {
    reg u[16];
    for (int g = 0; g < 4; ++g) {
      const reg* q = r + 4 * g;
      const reg t0 = _mm512_unpacklo_ps(q[0], q[1]), t1 = _mm512_unpackhi_ps(q[0], q[1]);
      const reg t2 = _mm512_unpacklo_ps(q[2], q[3]), t3 = _mm512_unpackhi_ps(q[2], q[3]);
      u[4 * g + 0] = _mm512_shuffle_ps(t0, t2, 0x44);
      u[4 * g + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);
      u[4 * g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
      u[4 * g + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      const reg a02 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);   // g0 L0 L2, g1 L0 L2
      const reg a13 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);   // g0 L1 L3, g1 L1 L3
      const reg b02 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
      const reg b13 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
      col[0 + c] = _mm512_shuffle_f32x4(a02, b02, 0x88);
      col[8 + c] = _mm512_shuffle_f32x4(a02, b02, 0xDD);
      col[4 + c] = _mm512_shuffle_f32x4(a13, b13, 0x88);
      col[12 + c] = _mm512_shuffle_f32x4(a13, b13, 0xDD);
    }
  }
  // Lane t of the result = the sum of a[t]'s 16 lanes, for t < 16, by a
  // fixed tree: pairs of registers interleaved and added within 128-bit
  // lanes (unpack, then shuffle), then 128-bit lanes gathered and added
  // (two rounds of shuffle_f32x4). 45 instructions for 16 sums; the decode
  // path's dot products of one query row with 16 keys.
  static reg lane_sums(const reg* a) {
    reg p[8], r[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
      p[i] = add(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                 _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: keys 4i .. 4i+3
      r[i] = add(_mm512_shuffle_ps(p[2 * i], p[2 * i + 1], 0x44),
                 _mm512_shuffle_ps(p[2 * i], p[2 * i + 1], 0xEE));
    const reg s01 = add(_mm512_shuffle_f32x4(r[0], r[1], 0x88), _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
    const reg s23 = add(_mm512_shuffle_f32x4(r[2], r[3], 0x88), _mm512_shuffle_f32x4(r[2], r[3], 0xDD));
    return add(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  }
  // 2^x's steps around the polynomial (simd_exp.h): n = round to nearest
  // even, r = x - n; then 2^n p by vscalef (exact for a normal result),
  // zeroed where x < limit (NaN x passes the test and stays NaN).
  static void exp2_split(reg x, reg& n, reg& r) {
    n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = sub(x, n);
  }
  static reg exp2_finish(reg p, reg n, reg x, reg limit) {
    return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, limit, _CMP_NLT_UQ), p, n);
  }
  // Lanes of `keep` where p == 0, of `value` elsewhere.
  static reg keep_where_zero(reg p, reg keep, reg value) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(p, zero(), _CMP_EQ_OQ), value, keep);
  }  // bfloat16 (the high half of a float32) in pairs: each 32-bit lane holds
  // elements 2i (low half) and 2i + 1 (high half). Widened exactly.
  static reg set1_bits(uint32_t bits) { return _mm512_castsi512_ps(_mm512_set1_epi32(int(bits))); }
  static reg bf16_low(reg pairs) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(pairs), 16));
  }
  static reg bf16_high(reg pairs) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_castps_si512(pairs), _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  // Pairs from two registers of float32, each rounded to bf16 to nearest
  // even (kernel_bf16.h's bf16_round, lane by lane; a NaN stays a NaN).
  // With AVX512-BF16: vcvtne2ps2bf16 (which rounds float32 subnormals to 0,
  // a difference vdpbf16ps does not see: it counts bf16 subnormals as 0)
  // and one permute to interleave, instead of 11 integer instructions (the
  // rounding was ~4% of the bf16 prefill, perf annotate).
#if defined(__AVX512BF16__)
  static reg bf16_round_pairs(reg lo, reg hi) {
    alignas(64) static constexpr int16_t kInterleave[32] = {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo's 16, then hi's
    return _mm512_castsi512_ps(_mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), halves));
  }
  // lo's and hi's 2W values rounded to bf16, in order, as W pairs (the
  // pair layout of 2W consecutive values of a row).
  static reg bf16_pack(reg lo, reg hi) { return (reg)_mm512_cvtne2ps_pbh(hi, lo); }
  static reg bf16_values(reg x) {  // x's lanes rounded to bf16 values, as float32
    const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
#else
  // x's lanes rounded to nearest even at bit 16 (the bf16 in the high
  // half; a NaN kept quiet), the low half left as it falls.
  static __m512i bf16_rounded_bits(reg x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i r = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                            _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __m512i nan = _mm512_or_si512(u, _mm512_set1_epi32(0x00400000));
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, nan);
  }
  static reg bf16_round_pairs(reg lo, reg hi) {
    return _mm512_castsi512_ps(
        _mm512_or_si512(_mm512_srli_epi32(bf16_rounded_bits(lo), 16),
                        _mm512_and_si512(bf16_rounded_bits(hi), _mm512_set1_epi32(int(0xFFFF0000u)))));
  }
  // x's lanes rounded to bf16 values, as float32 (bf16_round_pairs' rounding).
  static reg bf16_values(reg x) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(bf16_rounded_bits(x), _mm512_set1_epi32(int(0xFFFF0000u))));
  }
#endif
  // x's W lanes rounded to bf16 (as bf16_round_pairs) into dst[0, W).
  static void store_bf16(uint16_t* dst, reg x) {
    const reg pairs = bf16_round_pairs(x, zero());  // low halves: x rounded
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtepi32_epi16(_mm512_castps_si512(pairs)));
  }
#if defined(__AVX512BF16__)
  // acc + a.low * b.low + a.high * b.high, lane by lane, in one instruction
  // (vdpbf16ps; bf16 subnormal inputs count as zero).
  static constexpr bool kBf16Dot = true;
  static reg dot_bf16(reg acc, reg a, reg b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
  }
#else
  static constexpr bool kBf16Dot = false;
  static reg dot_bf16(reg acc, reg, reg) { return acc; }  // not called without the instruction
#endif
};

template <> struct Simd<double> {
  using scalar = double;
  using reg = __m512d;
  static constexpr int W = 8;
  static constexpr int MR = 8;
  static constexpr int kRegisters = 32;  // vector registers the compiler can allocate
  static constexpr int NV = 3;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(double x) { return _mm512_set1_pd(x); }
  static reg load(const double* p) { return _mm512_load_pd(p); }
  static reg loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, reg a) { _mm512_store_pd(p, a); }
  static void storeu(double* p, reg a) { _mm512_storeu_pd(p, a); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_pd(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
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
  static constexpr bool kHalfTile = false;
  static void transpose_tile_half(const uint16_t*, int64_t, double*) {}
  // Lane t = the sum of a[t]'s 8 lanes, t < 8 (the float tree, one level less).
  static reg lane_sums(const reg* a) {
    reg p[4];
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: a0+a1, b0+b1
      p[i] = add(_mm512_unpacklo_pd(a[2 * i], a[2 * i + 1]),
                 _mm512_unpackhi_pd(a[2 * i], a[2 * i + 1]));
    const reg s01 = add(_mm512_shuffle_f64x2(p[0], p[1], 0x88), _mm512_shuffle_f64x2(p[0], p[1], 0xDD));
    const reg s23 = add(_mm512_shuffle_f64x2(p[2], p[3], 0x88), _mm512_shuffle_f64x2(p[2], p[3], 0xDD));
    return add(_mm512_shuffle_f64x2(s01, s23, 0x88), _mm512_shuffle_f64x2(s01, s23, 0xDD));
  }
  static void transpose_tile(const double* src, int64_t ld, double* dst) {
    for (int r = 0; r < W; ++r)
      for (int c = 0; c < W; ++c) dst[c * W + r] = src[r * ld + c];
  }
  static void exp2_split(reg x, reg& n, reg& r) {  // as for float
    n = _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = sub(x, n);
  }
  static reg exp2_finish(reg p, reg n, reg x, reg limit) {
    return _mm512_maskz_scalef_pd(_mm512_cmp_pd_mask(x, limit, _CMP_NLT_UQ), p, n);
  }
  static reg keep_where_zero(reg p, reg keep, reg value) {
    return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(p, zero(), _CMP_EQ_OQ), value, keep);
  }
};

}  // namespace avx512
}  // namespace tileattn
