// Simd<T> for AVX2 + FMA (256-bit registers, 16 of them).
// Micro-tile: MR = 4 rows x NV = 3 registers of columns, 12 accumulators
// (+ 3 loaded operands + 1 broadcast = all 16 registers).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace tileattn {
namespace avx2 {

template <typename T> struct Simd;

template <> struct Simd<float> {
  using scalar = float;
  using reg = __m256;
  static constexpr int W = 8;
  static constexpr int MR = 4;
  static constexpr int kRegisters = 16;  // vector registers the compiler can allocate
  static constexpr int NV = 3;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg load(const float* p) { return _mm256_load_ps(p); }
  static reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static reg loadu_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // W bfloat16 values widened (exactly: a shift into the high half).
  static reg loadu_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static void store(float* p, reg a) { _mm256_store_ps(p, a); }
  static void storeu(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_ps(a, b); }
  static float hmax(reg a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float first(reg a) { return _mm256_cvtss_f32(a); }
  static float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // dst[c][r] = src[r][c] for an 8 x 8 tile (src row stride ld, dst rows of 8).
  static void transpose_tile(const float* src, int64_t ld, float* dst) {
    reg r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
    transpose_registers(r, dst);
  }
  // The same for a tile of IEEE binary16 values, widened as they are loaded.
  static constexpr bool kHalfTile = true;
  static void transpose_tile_half(const uint16_t* src, int64_t ld, float* dst) {
    reg r[8];
    for (int i = 0; i < 8; ++i)
      r[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ld)));
    transpose_registers(r, dst);
  }
  static void transpose_tile_bf16(const uint16_t* src, int64_t ld, float* dst) {
    reg r[8];
    for (int i = 0; i < 8; ++i) r[i] = loadu_bf16(src + i * ld);
    transpose_registers(r, dst);
  }
  static void transpose_registers(const reg* rows, float* dst) {
    reg c[8];
    transpose_in_registers(rows, c);
    for (int i = 0; i < 8; ++i) _mm256_store_ps(dst + i * 8, c[i]);
  }
  // Lane t of the result = the sum of a[t]'s 8 lanes, t < 8, by a fixed
  // tree: pairs interleaved and added within 128-bit lanes (unpack, then
  // shuffle), then the two halves added (permute2f128).
  static reg lane_sums(const reg* a) {
    reg p[4];
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3
      p[i] = add(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                 _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    const reg r0 = add(_mm256_shuffle_ps(p[0], p[1], 0x44), _mm256_shuffle_ps(p[0], p[1], 0xEE));
    const reg r1 = add(_mm256_shuffle_ps(p[2], p[3], 0x44), _mm256_shuffle_ps(p[2], p[3], 0xEE));
    return add(_mm256_permute2f128_ps(r0, r1, 0x20), _mm256_permute2f128_ps(r0, r1, 0x31));
  }
  static void transpose_in_registers(const reg* rows, reg* col) {
    __m256 r0 = rows[0], r1 = rows[1], r2 = rows[2], r3 = rows[3];
    __m256 r4 = rows[4], r5 = rows[5], r6 = rows[6], r7 = rows[7];
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    r0 = _mm256_shuffle_ps(t0, t2, 0x44);
    r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    r2 = _mm256_shuffle_ps(t1, t3, 0x44);
    r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    r4 = _mm256_shuffle_ps(t4, t6, 0x44);
    r5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    r6 = _mm256_shuffle_ps(t5, t7, 0x44);
    r7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    col[0] = _mm256_permute2f128_ps(r0, r4, 0x20);
    col[1] = _mm256_permute2f128_ps(r1, r5, 0x20);
    col[2] = _mm256_permute2f128_ps(r2, r6, 0x20);
    col[3] = _mm256_permute2f128_ps(r3, r7, 0x20);
    col[4] = _mm256_permute2f128_ps(r0, r4, 0x31);
    col[5] = _mm256_permute2f128_ps(r1, r5, 0x31);
    col[6] = _mm256_permute2f128_ps(r2, r6, 0x31);
    col[7] = _mm256_permute2f128_ps(r3, r7, 0x31);
  }
  static constexpr float round_magic() { return 12582912.0f; }  // 1.5 * 2^23
  static reg scale_by_pow2(reg p, reg t) {
    const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(t),
                                       _mm256_castps_si256(set1(round_magic())));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  }
  static reg zero_where_less(reg x, reg limit, reg value) {
    return _mm256_andnot_ps(_mm256_cmp_ps(x, limit, _CMP_LT_OQ), value);
  }
  // Lanes of `keep` where p == 0, of `value` elsewhere.
  static reg keep_where_zero(reg p, reg keep, reg value) {
    return _mm256_blendv_ps(value, keep, _mm256_cmp_ps(p, zero(), _CMP_EQ_OQ));
  }
  // bfloat16 pairs, as in simd_avx512.h; no bf16 dot product on this path.
  static reg set1_bits(uint32_t bits) { return _mm256_castsi256_ps(_mm256_set1_epi32(int(bits))); }
  static reg bf16_low(reg pairs) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(pairs), 16));
  }
  static reg bf16_high(reg pairs) {
    return _mm256_castsi256_ps(
        _mm256_and_si256(_mm256_castps_si256(pairs), _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  static __m256i bf16_rounded_bits(reg x) {  // as in simd_avx512.h
    const __m256i u = _mm256_castps_si256(x);
    const __m256i r = _mm256_add_epi32(
        u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                            _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    const __m256i nan = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    return _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  }
  static reg bf16_round_pairs(reg lo, reg hi) {  // as in simd_avx512.h
    return _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_srli_epi32(bf16_rounded_bits(lo), 16),
                        _mm256_and_si256(bf16_rounded_bits(hi), _mm256_set1_epi32(int(0xFFFF0000u)))));
  }
  static reg bf16_values(reg x) {  // as in simd_avx512.h
    return _mm256_castsi256_ps(
        _mm256_and_si256(bf16_rounded_bits(x), _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  static void store_bf16(uint16_t* dst, reg x) {  // as in simd_avx512.h
    const __m256i r = _mm256_castps_si256(bf16_round_pairs(x, zero()));  // < 2^16 per lane
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
  }
  static constexpr bool kBf16Dot = false;
  static reg dot_bf16(reg acc, reg, reg) { return acc; }  // not called
};

template <> struct Simd<double> {
  using scalar = double;
  using reg = __m256d;
  static constexpr int W = 4;
  static constexpr int MR = 4;
  static constexpr int kRegisters = 16;  // vector registers the compiler can allocate
  static constexpr int NV = 3;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg set1(double x) { return _mm256_set1_pd(x); }
  static reg load(const double* p) { return _mm256_load_pd(p); }
  static reg loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, reg a) { _mm256_store_pd(p, a); }
  static void storeu(double* p, reg a) { _mm256_storeu_pd(p, a); }
  static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_pd(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_pd(a, b); }
  static reg min(reg a, reg b) { return _mm256_min_pd(a, b); }
  static double hmax(reg a) {
    __m128d m = _mm_max_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    m = _mm_max_sd(m, _mm_unpackhi_pd(m, m));
    return _mm_cvtsd_f64(m);
  }
  static double first(reg a) { return _mm256_cvtsd_f64(a); }
  static double hsum(reg a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
  // dst[c][r] = src[r][c] for a 4 x 4 tile (src row stride ld, dst rows of 4).
  static constexpr bool kHalfTile = false;
  static void transpose_tile_half(const uint16_t*, int64_t, double*) {}
  // Lane t = the sum of a[t]'s 4 lanes, t < 4.
  static reg lane_sums(const reg* a) {
    const reg p0 = add(_mm256_unpacklo_pd(a[0], a[1]), _mm256_unpackhi_pd(a[0], a[1]));
    const reg p1 = add(_mm256_unpacklo_pd(a[2], a[3]), _mm256_unpackhi_pd(a[2], a[3]));
    return add(_mm256_permute2f128_pd(p0, p1, 0x20), _mm256_permute2f128_pd(p0, p1, 0x31));
  }
  static void transpose_tile(const double* src, int64_t ld, double* dst) {
    const __m256d r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + ld);
    const __m256d r2 = _mm256_loadu_pd(src + 2 * ld), r3 = _mm256_loadu_pd(src + 3 * ld);
    const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
    const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
    _mm256_store_pd(dst + 0, _mm256_permute2f128_pd(t0, t2, 0x20));
    _mm256_store_pd(dst + 4, _mm256_permute2f128_pd(t1, t3, 0x20));
    _mm256_store_pd(dst + 8, _mm256_permute2f128_pd(t0, t2, 0x31));
    _mm256_store_pd(dst + 12, _mm256_permute2f128_pd(t1, t3, 0x31));
  }
  static constexpr double round_magic() { return 6755399441055744.0; }  // 1.5 * 2^52
  static reg scale_by_pow2(reg p, reg t) {
    const __m256i n = _mm256_sub_epi64(_mm256_castpd_si256(t),
                                       _mm256_castpd_si256(set1(round_magic())));
    const __m256i bits = _mm256_slli_epi64(_mm256_add_epi64(n, _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
  }
  static reg zero_where_less(reg x, reg limit, reg value) {
    return _mm256_andnot_pd(_mm256_cmp_pd(x, limit, _CMP_LT_OQ), value);
  }
  static reg keep_where_zero(reg p, reg keep, reg value) {
    return _mm256_blendv_pd(value, keep, _mm256_cmp_pd(p, zero(), _CMP_EQ_OQ));
  }
};

}  // namespace avx2
}  // namespace tileattn
