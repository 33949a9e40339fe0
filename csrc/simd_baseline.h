// Simd<T> for the portable path: GCC/Clang vector extensions, 128-bit
// registers (SSE2 on x86-64, NEON on aarch64). No FMA is assumed, so
// fmadd is a multiply and an add; the compiler never contracts them
// because we build with -std=c++17 (fp-contract off).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace tileattn {
namespace baseline {

template <typename T, typename I, int Lanes, int Bits, int Bias>
struct VecExtSimd {
  using scalar = T;
  typedef T reg __attribute__((vector_size(16)));
  static constexpr int W = Lanes;
  static constexpr int MR = 4;  // micro-tile: MR rows x NV registers
  static constexpr int kRegisters = 16;  // vector registers (x86-64 SSE2; aarch64 has 32)
  static constexpr int NV = 3;
  static reg zero() { return reg{} ; }
  static reg set1(T x) { return reg{} + x; }
  static reg load(const T* p) { reg r; std::memcpy(&r, p, sizeof r); return r; }
  static reg loadu(const T* p) { return load(p); }
  static void store(T* p, reg a) { std::memcpy(p, &a, sizeof a); }
  static void storeu(T* p, reg a) { store(p, a); }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg div(reg a, reg b) { return a / b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  // x86's maxps/minps semantics (a NaN in either gives b), so that every
  // path treats NaN the same way.
  static reg max(reg a, reg b) { for (int i = 0; i < W; ++i) a[i] = a[i] > b[i] ? a[i] : b[i]; return a; }
  static reg min(reg a, reg b) { for (int i = 0; i < W; ++i) a[i] = a[i] < b[i] ? a[i] : b[i]; return a; }
  static T hmax(reg a) { T m = a[0]; for (int i = 1; i < W; ++i) m = m < a[i] ? a[i] : m; return m; }
  static T first(reg a) { return a[0]; }
  static T hsum(reg a) {
    // Pairwise, like the SIMD paths: ((a0 + a2) + (a1 + a3)) for 4 lanes.
    for (int half = W / 2; half >= 1; half /= 2)
      for (int i = 0; i < half; ++i) a[i] = a[i] + a[i + half];
    return a[0];
  }
  // dst[c][r] = src[r][c] for a W x W tile (src row stride ld, dst rows of W).
  static constexpr bool kHalfTile = false;  // no F16C here: widen_row instead
  static void transpose_tile_half(const uint16_t*, int64_t, T*) {}
  // Lane t of the result = hsum(a[t]), t < W.
  static reg lane_sums(const reg* a) {
    reg r;
    for (int t = 0; t < W; ++t) r[t] = hsum(a[t]);
    return r;
  }
  static void transpose_tile(const T* src, int64_t ld, T* dst) {
    for (int r = 0; r < W; ++r)
      for (int c = 0; c < W; ++c) dst[c * W + r] = src[r * ld + c];
  }
  static constexpr T round_magic() { return T(1.5) * T(I(1) << Bits); }
  // The exponent arithmetic wraps, as the SIMD paths' integer lanes do, in
  // unsigned lanes: for an x far below the underflow limit (a result the
  // caller zeroes) the signed difference would overflow, which C++ leaves
  // undefined (UBSan's report, on GELU of large negative inputs).
  typedef std::make_unsigned_t<I> U;
  typedef U ureg __attribute__((vector_size(16)));
  static reg scale_by_pow2(reg p, reg t) {
    ureg ti, mi;
    const reg magic = set1(round_magic());
    std::memcpy(&ti, &t, sizeof t);
    std::memcpy(&mi, &magic, sizeof magic);
    const ureg bits = (ti - mi + U(Bias)) << Bits;
    reg scale;
    std::memcpy(&scale, &bits, sizeof bits);
    return p * scale;
  }
  // Lanes of `keep` where p == 0, of `value` elsewhere.
  static reg keep_where_zero(reg p, reg keep, reg value) {
    for (int i = 0; i < W; ++i) value[i] = p[i] == T(0) ? keep[i] : value[i];
    return value;
  }
  static reg zero_where_less(reg x, reg limit, reg value) {
    for (int i = 0; i < W; ++i) value[i] = x[i] < limit[i] ? T(0) : value[i];
    return value;
  }  // bfloat16 pairs, as in simd_avx512.h (float lanes only); no bf16 dot
  // product on this path.
  static reg set1_bits(U bits) { reg r; ureg u = ureg{} + bits; std::memcpy(&r, &u, sizeof r); return r; }
  static reg bf16_low(reg pairs) { return from_bits(bits_of(pairs) << 16); }
  static reg bf16_high(reg pairs) { return from_bits(bits_of(pairs) & U(0xFFFF0000u)); }
  static ureg bits_of(reg a) { ureg u; std::memcpy(&u, &a, sizeof u); return u; }
  static reg from_bits(ureg u) { reg r; std::memcpy(&r, &u, sizeof r); return r; }
  static ureg bf16_rounded_bits(reg x) {  // as in simd_avx512.h
    const ureg u = bits_of(x);
    ureg r = u + (U(0x7FFF) + ((u >> 16) & U(1)));
    for (int i = 0; i < W; ++i)
      if (x[i] != x[i]) r[i] = u[i] | U(0x00400000);
    return r;
  }
  static reg bf16_round_pairs(reg lo, reg hi) {  // as in simd_avx512.h
    return from_bits((bf16_rounded_bits(lo) >> 16) | (bf16_rounded_bits(hi) & U(0xFFFF0000u)));
  }
  static reg bf16_values(reg x) {  // as in simd_avx512.h
    return from_bits(bf16_rounded_bits(x) & U(0xFFFF0000u));
  }
  static void store_bf16(uint16_t* dst, reg x) {  // as in simd_avx512.h
    const ureg r = bits_of(bf16_round_pairs(x, zero()));
    uint16_t h[W];
    for (int i = 0; i < W; ++i) h[i] = static_cast<uint16_t>(r[i]);
    std::memcpy(dst, h, sizeof h);
  }
  static constexpr bool kBf16Dot = false;
  static reg dot_bf16(reg acc, reg, reg) { return acc; }  // not called
};

template <typename T> struct Simd;
template <> struct Simd<float> : VecExtSimd<float, int32_t, 4, 23, 127> {};
template <> struct Simd<double> : VecExtSimd<double, int64_t, 2, 52, 1023> {};

}  // namespace baseline
}  // namespace tileattn
