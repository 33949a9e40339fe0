// Products on bfloat16 operands with float32 sums. A fragment included
// inside tileattn::<isa> (see kernel_common.h); Simd<float> comes from that
// ISA's simd_<isa>.h.
//
// bfloat16 is the high half of a float32 (8 exponent bits, 8 significant
// bits). Operands are held in pairs, two consecutive elements along the
// summed dimension in one 32-bit word (element 2i in the low half, 2i + 1
// in the high half): the layout vdpbf16ps takes, and on paths without it
// two shifts widen a register of pairs into two registers of exact float32
// values.
//
// The numerical contract: the product of two bf16 values is exact in
// float32, so on every path each output element is a float32 sum of exact
// products, formed in a fixed order (pair by pair, in increasing k) whatever
// the tiling, the thread count or the rows around it. The avx512_bf16 path
// sums each pair inside vdpbf16ps (which counts bf16 subnormals, below
// ~1.2e-38, as zero); the others add element 2i, then 2i + 1, each an FMA.
// The paths may differ by round-off from each other; each keeps its bits.

enum class Bf16Pair : uint32_t {};

// float32 -> bfloat16, rounded to nearest even (as ml_dtypes and PyTorch
// round); a NaN stays a (quiet) NaN, infinities stay infinite.
inline uint16_t bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_widen(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline Bf16Pair bf16_pair(uint16_t low, uint16_t high) {
  return static_cast<Bf16Pair>(static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16));
}

// n float32 values rounded into (n + 1) / 2 pairs (an odd n's last high
// half is zero).
inline void bf16_pairs_from(const float* src, int64_t n, Bf16Pair* dst) {
  int64_t i = 0;
  for (; i + 1 < n; i += 2) dst[i / 2] = bf16_pair(bf16_round(src[i]), bf16_round(src[i + 1]));
  if (i < n) dst[i / 2] = bf16_pair(bf16_round(src[i]), 0);
}
// The same from values already in bf16.
inline void bf16_pairs_from(const uint16_t* src, int64_t n, Bf16Pair* dst) {
  int64_t i = 0;
  for (; i + 1 < n; i += 2) dst[i / 2] = bf16_pair(src[i], src[i + 1]);
  if (i < n) dst[i / 2] = bf16_pair(src[i], 0);
}

// x's lanes rounded to bf16, as float32 values (the widened method's
// operands: products of two of them are exact in float32).
inline float bf16_value(float x) { return bf16_widen(bf16_round(x)); }

// The micro-kernels' operand policy for pairs (ElementSteps' counterpart,
// kernel_common.h): one pair of each operand per step, its two products
// summed into float32, by the bf16 dot product where the ISA has it, else
// widened by two shifts into two fused multiply-adds (element 2i, then
// 2i + 1). The prefill rounds Q unscaled (scaling it first would add a
// rounding to every score), so it scales the scores after the sums.
// madd_skip_zero (the prefill's blocks of V with a non-finite value) widens
// the pairs and leaves each half out where its probability is 0, as the
// float32 kernel does: the dot product would add 0 * inf. It serves only
// such blocks, so its speed does not matter.
struct PairSteps {
  using Operand = Bf16Pair;
  using Value = float;
  using S = Simd<float>;
  using reg = S::reg;
  static constexpr int64_t kPerStep = 2;
  static constexpr bool kScaleScores = true;
  static reg broadcast(Bf16Pair x) { return S::set1_bits(static_cast<uint32_t>(x)); }
  static reg load(const Bf16Pair* x) { return S::load(reinterpret_cast<const float*>(x)); }
  static reg madd(reg acc, reg a, reg b) {
    if constexpr (S::kBf16Dot)
      return S::dot_bf16(acc, a, b);
    else
      return S::fmadd(S::bf16_high(a), S::bf16_high(b),
                      S::fmadd(S::bf16_low(a), S::bf16_low(b), acc));
  }
  static reg madd_skip_zero(reg acc, reg a, reg b) {
    const reg a_lo = S::bf16_low(a), a_hi = S::bf16_high(a);
    const reg b_lo = S::bf16_low(b), b_hi = S::bf16_high(b);
    acc = S::keep_where_zero(b_lo, acc, S::fmadd(a_lo, b_lo, acc));
    return S::keep_where_zero(b_hi, acc, S::fmadd(a_hi, b_hi, acc));
  }
};

