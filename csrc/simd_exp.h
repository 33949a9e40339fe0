// Vectorised 2^x shared by every instruction set. S is a Simd<T> from
// simd_<isa>.h; it supplies the arithmetic and either its own steps around
// the polynomial, exp2_split (x -> n, r) and exp2_finish (p, n -> 2^n p, or
// 0 below the underflow limit), or the bit-level helpers of the default
// steps: round_magic(), scale_by_pow2(p, t) and zero_where_less.
//
// The kernels keep their scores in natural units and form each softmax
// exponent as (s - m) * log2(e) (vec_exp_diff below), so the exponential
// itself is a 2^x with no ln(2) range reduction.
//
// 2^x = 2^n * 2^r with n = round(x) (to nearest even), r = x - n in
// [-1/2, 1/2] (exact). AVX2 and the baseline round by adding 1.5 *
// 2^mantissa_bits, so t's low mantissa bits hold n and no float-to-int
// conversion is needed (AVX2 has none for doubles), then build 2^n from
// those bits; AVX-512 rounds with vrndscale and scales with vscalef, masking
// in the underflow test (11 instructions per register instead of 16, the
// same bits: both scalings are exact for the normal results kept). 2^r is a
// polynomial: float, degree 6 fitted for minimal relative error
// (tools/fit_exp2_poly.py: 8.2e-8 max, 0.7 ulp, in float32); double, the
// Taylor series of e^(r ln 2) to degree 13 (truncation < 5e-18); and for
// exponentials that are rounded to bf16 next (the probabilities of bf16
// products), float degree 4 (3.1e-6 max, two multiply-adds fewer; their
// sum l is not rounded, and degree 3's 1.2e-4 would have been as large as
// the averaged rounding errors of P over a few thousand keys). Inputs
// below the smallest normal result give exactly 0, so 2^-inf = 0 as masked
// scores need; NaN stays NaN.
#pragma once

#include <array>
#include <type_traits>

namespace tileattn {

template <typename T> struct Exp2Constants;

template <> struct Exp2Constants<float> {
  static constexpr int degree = 6;
  static constexpr std::array<float, degree + 1> coef = {
      1.000000000e+00f, 6.931471825e-01f, 2.402264774e-01f, 5.550328642e-02f,
      9.618433192e-03f, 1.340030693e-03f, 1.535740885e-04f};
  static constexpr float underflow = -126.0f;  // 2^-126 = FLT_MIN
  static constexpr float overflow = 127.0f;
};

// tools/fit_exp2_poly.py 4.
struct Exp2Bf16Constants {
  static constexpr int degree = 4;
  static constexpr std::array<float, degree + 1> coef = {
      1.000000000e+00f, 6.931222677e-01f, 2.402405292e-01f, 5.591978133e-02f,
      9.588480927e-03f};
  static constexpr float underflow = -126.0f;
  static constexpr float overflow = 127.0f;
};

// (ln 2)^k / k!, computed at compile time.
constexpr std::array<double, 14> taylor_exp2_coefficients() {
  std::array<double, 14> c{};
  c[0] = 1.0;
  for (int k = 1; k < 14; ++k) c[k] = c[k - 1] * 0.69314718055994530942 / k;
  return c;
}

template <> struct Exp2Constants<double> {
  static constexpr int degree = 13;
  static constexpr std::array<double, degree + 1> coef = taylor_exp2_coefficients();
  static constexpr double underflow = -1022.0;  // 2^-1022 = DBL_MIN
  static constexpr double overflow = 1023.0;
};

// The default steps around the polynomial (AVX2, baseline): t = x + magic
// keeps n in its low mantissa bits; 2^n p is built from those bits.
template <class S>
struct MagicExp2Steps {
  using reg = typename S::reg;
  static void exp2_split(reg x, reg& t, reg& r) {
    const reg magic = S::set1(S::round_magic());
    t = S::add(x, magic);
    r = S::sub(x, S::sub(t, magic));
  }
  static reg exp2_finish(reg p, reg t, reg x, reg limit) {
    return S::zero_where_less(x, limit, S::scale_by_pow2(p, t));
  }
};

// S itself when it brings its own exp2_split / exp2_finish (AVX-512).
template <class S, class = void>
struct Exp2Steps {
  using type = MagicExp2Steps<S>;
};
template <class S>
struct Exp2Steps<S, std::void_t<decltype(&S::exp2_split)>> {
  using type = S;
};

// 2^x for x <= overflow or NaN, with no clamp: the softmax's exponents,
// (s - max) log2 e <= 0 (or NaN), where the clamp would leave x as it is. The same
// bits as vec_exp2, one instruction sooner (the softmax exponential is ~14
// instructions per register, ~9% of a block).
template <class S, class C = Exp2Constants<typename S::scalar>>
inline typename S::reg vec_exp2_unclamped(typename S::reg x) {
  using reg = typename S::reg;
  using Steps = typename Exp2Steps<S>::type;
  reg n, r;  // n: round(x), in the steps' own encoding
  Steps::exp2_split(x, n, r);
  reg p = S::set1(C::coef[C::degree]);
  for (int k = C::degree - 1; k >= 0; --k) p = S::fmadd(p, r, S::set1(C::coef[k]));
  return Steps::exp2_finish(p, n, x, S::set1(C::underflow));
}

template <class S>
inline typename S::reg vec_exp2(typename S::reg x) {
  // min(limit, x), not min(x, limit): the SIMD min returns its second operand
  // when either is NaN, and a NaN x must stay NaN (not become 2^overflow).
  return vec_exp2_unclamped<S>(S::min(S::set1(Exp2Constants<typename S::scalar>::overflow), x));
}

// log2(e) rounded to T.
template <typename T>
constexpr T kLog2eOf = static_cast<T>(1.44269504088896340736);

// e^(a - b) = 2^((a - b) log2 e), for natural-unit scores a and a reference
// b (the row's running max, or its log-sum-exp). The difference comes
// first: exact for the scores near b (Sterbenz), so the weights that matter
// take one rounding, of the product, at the size of the exponent, as a
// NumPy softmax's exp(s - max) does; and a = b gives exactly 1. Scores kept
// in base 2 (log2 e folded into the queries) would instead carry each
// score's own rounding at 1.44 times its size, plus the rounding of every
// query and mask entry by log2 e: measured, one dominant key's weight was
// then 6 ulp off where NumPy's was 1.4. Costs one multiply per register.
template <class S>
inline typename S::reg base2_exponent(typename S::reg a, typename S::reg b) {
  return S::mul(S::sub(a, b), S::set1(kLog2eOf<typename S::scalar>));
}
template <class S>
inline typename S::reg vec_exp_diff_unclamped(typename S::reg a, typename S::reg b) {
  return vec_exp2_unclamped<S>(base2_exponent<S>(a, b));
}
template <class S>
inline typename S::reg vec_exp_diff(typename S::reg a, typename S::reg b) {
  return vec_exp2<S>(base2_exponent<S>(a, b));
}
// To bf16 accuracy (float lanes only): for probabilities rounded to bf16.
template <class S>
inline typename S::reg vec_exp_diff_bf16(typename S::reg a, typename S::reg b) {
  return vec_exp2_unclamped<S, Exp2Bf16Constants>(base2_exponent<S>(a, b));
}

}  // namespace tileattn
