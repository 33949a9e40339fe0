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
template <class S>
inline typename S::reg bf16_values(typename S::reg x) {
  return S::bf16_low(S::bf16_round_pairs(x, S::zero()));
}
inline float bf16_value(float x) { return bf16_widen(bf16_round(x)); }

// gemm_micro (kernel_gemm.h) on pairs: c[R][NV * W] (row stride ldc) (+)=
// sum over x < kd of a[r * a_rs + x * a_cs] . b[x * ldb + lane], each term
// the dot product of two pairs. The same options: the sum formed from zero
// and then added to c when accumulating, then_add added last, kAhead and
// kStream prefetches (which change no value).
template <int NV, int R, int kAhead = 0, bool kStream = false>
inline void gemm_micro_bf16(const Bf16Pair* a, int64_t a_rs, int64_t a_cs, const Bf16Pair* b,
                            int64_t ldb, int64_t kd, float* c, int64_t ldc, bool accumulate,
                            const float* then_add = nullptr, const char* stream = nullptr,
                            int64_t per_step = 0) {
  using S = Simd<float>;
  using reg = typename S::reg;
  constexpr int W = S::W;
  static_assert(R >= 1 && R <= S::MR, "at most MR rows: the accumulators fill the registers");
  reg acc[R][NV];
  TILEATTN_UNROLL
  for (int r = 0; r < R; ++r)
    TILEATTN_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  TILEATTN_UNROLL_STEPS
  for (int64_t x = 0; x < kd; ++x) {
    reg bx[NV];
    TILEATTN_UNROLL
    for (int v = 0; v < NV; ++v)
      bx[v] = S::load(reinterpret_cast<const float*>(b + x * ldb + v * W));
    if constexpr (kAhead > 0) {
      TILEATTN_UNROLL
      for (int v = 0; v < NV; ++v) __builtin_prefetch(b + (x + kAhead) * ldb + v * W, 0, 2);
    }
    if constexpr (kStream) {
      const char* line = stream + x * per_step * 64;
      for (int64_t i = 0; i < per_step; ++i) __builtin_prefetch(line + i * 64, 0, 2);
    }
    const Bf16Pair* ax = a + x * a_cs;
    if constexpr (S::kBf16Dot) {
      TILEATTN_UNROLL
      for (int r = 0; r < R; ++r) {
        const reg ar = S::set1_bits(static_cast<uint32_t>(ax[r * a_rs]));
        TILEATTN_UNROLL
        for (int v = 0; v < NV; ++v) acc[r][v] = S::dot_bf16(acc[r][v], ar, bx[v]);
      }
    } else {
      reg lo[NV], hi[NV];
      TILEATTN_UNROLL
      for (int v = 0; v < NV; ++v) {
        lo[v] = S::bf16_low(bx[v]);
        hi[v] = S::bf16_high(bx[v]);
      }
      TILEATTN_UNROLL
      for (int r = 0; r < R; ++r) {
        const uint32_t pair = static_cast<uint32_t>(ax[r * a_rs]);
        const reg a_lo = S::set1_bits(pair << 16), a_hi = S::set1_bits(pair & 0xFFFF0000u);
        TILEATTN_UNROLL
        for (int v = 0; v < NV; ++v)
          acc[r][v] = S::fmadd(a_hi, hi[v], S::fmadd(a_lo, lo[v], acc[r][v]));
      }
    }
  }
  TILEATTN_UNROLL
  for (int r = 0; r < R; ++r)
    TILEATTN_UNROLL
    for (int v = 0; v < NV; ++v) {
      float* cv = c + r * ldc + v * W;
      reg sum = accumulate ? S::add(S::loadu(cv), acc[r][v]) : acc[r][v];
      if (then_add) sum = S::add(sum, S::loadu(then_add + v * W));
      S::storeu(cv, sum);
    }
}
