// Vectorised exp shared by every instruction set. S is a Simd<T> from
// simd_<isa>.h; it supplies the arithmetic and two bit-level helpers:
// round_to_int_magic() and scale_by_pow2(p, t).
//
// exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln(2)/2. The
// rounding uses the "add 1.5 * 2^mantissa_bits" trick, so t's low mantissa
// bits hold n and no float-to-int conversion instruction is needed (AVX2 has
// none for doubles). exp(r) is its Taylor polynomial, of a degree that keeps
// the truncation error below one ulp (float: r^8/8! < 6e-9, double:
// r^14/14! < 5e-18). Inputs below the smallest normal result give exactly 0,
// so exp(-inf) = 0 as the masks need; NaN stays NaN.
#pragma once

#include <limits>

namespace tileattn {

template <typename T> struct ExpConstants;

template <> struct ExpConstants<float> {
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f;  // few mantissa bits: n * ln2_hi is exact
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float underflow = -87.0f;     // exp(-87) ~ 1.6e-38, just above FLT_MIN
  static constexpr float overflow = 88.5f;
  static constexpr int degree = 7;
};

template <> struct ExpConstants<double> {
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double underflow = -708.0;    // just above log(DBL_MIN)
  static constexpr double overflow = 709.0;
  static constexpr int degree = 13;
};

template <class S>
inline typename S::reg vec_exp(typename S::reg x) {
  using T = typename S::scalar;
  using C = ExpConstants<T>;
  using reg = typename S::reg;
  const reg xc = S::min(x, S::set1(C::overflow));
  const reg magic = S::set1(S::round_magic());
  const reg t = S::fmadd(xc, S::set1(C::log2e), magic);  // low bits of t = n
  const reg n = S::sub(t, magic);
  reg r = S::fnmadd(n, S::set1(C::ln2_hi), xc);
  r = S::fnmadd(n, S::set1(C::ln2_lo), r);
  // Horner on sum_{k=0..degree} r^k / k!, highest term first.
  T coef[C::degree + 1];
  coef[0] = 1;
  for (int k = 1; k <= C::degree; ++k) coef[k] = coef[k - 1] / static_cast<T>(k);
  reg p = S::set1(coef[C::degree]);
  for (int k = C::degree - 1; k >= 0; --k) p = S::fmadd(p, r, S::set1(coef[k]));
  const reg result = S::scale_by_pow2(p, t);
  return S::zero_where_less(x, S::set1(C::underflow), result);
}

}  // namespace tileattn
