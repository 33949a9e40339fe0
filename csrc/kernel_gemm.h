// A small register-blocked matrix product for the backward's tiles. A
// fragment included inside tileattn::<isa> (see kernel_common.h); Simd<T>
// comes from that ISA's simd_<isa>.h.
//
// The backward needs five products per tile, with the small operand on
// either side and transposed or not. One kernel serves them all: the left
// operand A is read by scalar broadcasts through two strides (so A or A^T
// costs the same), the right operand B and the result C are row-major with
// rows of whole SIMD registers. Every element of C is one fused
// multiply-add chain in increasing order of the inner index, whatever the
// tile sizes, so the products are bitwise reproducible.

// c[MR][NV * W] (row stride ldc) (+)= sum over x < kd of
// a[r * a_rs + x * a_cs] * b[x * ldb + lane]. b is 64-byte aligned and ldb
// a multiple of W; c may have any alignment and row stride (the projections
// write into the caller's array). The sum over x is formed on its own and then
// added to c (c + (a b), not one chain continuing from c): sums that run
// over many calls (dK over every query block) are then blocked, with
// rounding errors growing with the block length plus the number of
// blocks rather than with the whole length. With kSkipZero, a term whose a is 0 is left
// out instead of adding 0 * b: the same sum for finite b, and a NaN or inf
// in a row of b that a row of a does not use (a hidden key) stays out.
// With a row vector `then_add` (NV * W values), each row of C gets it added
// last: the projections' bias, in the epilogue of their last K slice.
// R rows instead of MR: the projections' skinny path (a decode step's few
// rows); each element's chain is the same whatever R, so are its bits.
// kAhead > 0 prefetches b that many rows ahead into L2. kStream: each step
// also prefetches `per_step` 64-byte lines of another region into L2,
// consecutive from `stream` (the skinny path's next K slice, fetched while
// this one computes). Prefetches change no value.
// Steps is the operand policy (kernel_common.h): ElementSteps<T> for the
// backward and float projections, PairSteps for bf16 weights (each term
// then the sum of a pair's two products; kSkipZero is for elements only).
template <typename Steps, int NV, bool kSkipZero = false, int R = Steps::S::MR, int kAhead = 0,
          bool kStream = false>
inline void gemm_micro(const typename Steps::Operand* a, int64_t a_rs, int64_t a_cs,
                       const typename Steps::Operand* b, int64_t ldb, int64_t kd,
                       typename Steps::Value* c, int64_t ldc, bool accumulate,
                       const typename Steps::Value* then_add = nullptr,
                       const char* stream = nullptr, int64_t per_step = 0) {
  using S = typename Steps::S;
  using T = typename Steps::Value;
  using reg = typename S::reg;
  constexpr int MR = R, W = S::W;
  static_assert(R >= 1 && R <= S::MR, "at most MR rows: the accumulators fill the registers");
  static_assert(!kSkipZero || Steps::kPerStep == 1, "skipping zero terms needs single elements");
  reg acc[MR][NV];
  TILEATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    TILEATTN_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  TILEATTN_UNROLL_STEPS
  for (int64_t x = 0; x < kd; ++x) {
    reg bx[NV];
    TILEATTN_UNROLL
    for (int v = 0; v < NV; ++v) bx[v] = Steps::load(b + x * ldb + v * W);
    if constexpr (kAhead > 0) {
      TILEATTN_UNROLL
      for (int v = 0; v < NV; ++v)
        __builtin_prefetch(b + (x + kAhead) * ldb + v * W, 0, 2);
    }
    if constexpr (kStream) {
      const char* line = stream + x * per_step * 64;
      for (int64_t i = 0; i < per_step; ++i) __builtin_prefetch(line + i * 64, 0, 2);
    }
    const typename Steps::Operand* ax = a + x * a_cs;
    TILEATTN_UNROLL
    for (int r = 0; r < MR; ++r) {
      const reg ar = Steps::broadcast(ax[r * a_rs]);
      TILEATTN_UNROLL
      for (int v = 0; v < NV; ++v) {
        if (kSkipZero)
          acc[r][v] = S::keep_where_zero(ar, acc[r][v], Steps::madd(acc[r][v], ar, bx[v]));
        else
          acc[r][v] = Steps::madd(acc[r][v], ar, bx[v]);
      }
    }
  }
  TILEATTN_UNROLL
  for (int r = 0; r < MR; ++r)
    TILEATTN_UNROLL
    for (int v = 0; v < NV; ++v) {
      T* cv = c + r * ldc + v * W;
      reg sum = accumulate ? S::add(S::loadu(cv), acc[r][v]) : acc[r][v];
      if (then_add) sum = S::add(sum, S::loadu(then_add + v * W));
      S::storeu(cv, sum);
    }
}

// C (m x n) (+)= A (m x kd) B (kd x n), with m a multiple of MR and n a
// multiple of W (callers pad their tiles). Column strips of C are the outer
// loop, so a strip of B (kd x NV * W) stays in L1 while A streams past it.
template <typename T, bool kSkipZero = false>
void gemm_tile(int64_t m, int64_t n, int64_t kd, const T* a, int64_t a_rs, int64_t a_cs,
               const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  using S = Simd<T>;
  using Steps = ElementSteps<T>;
  constexpr int MR = S::MR, W = S::W, NV = S::NV;
  static_assert(NV == 3, "the remainder strips below assume three registers per strip");
  int64_t j = 0;
  // Four registers wide (e.g. a head size of 64 floats on AVX-512): two
  // strips of two, not three and one, so no strip is load-bound.
  const int64_t wide = n == 4 * W ? 0 : n;
  for (; j + NV * W <= wide; j += NV * W)
    for (int64_t i = 0; i < m; i += MR)
      gemm_micro<Steps, NV, kSkipZero>(a + i * a_rs, a_rs, a_cs, b + j, ldb, kd,
                                       c + i * ldc + j, ldc, accumulate);
  for (; n - j >= 2 * W; j += 2 * W)
    for (int64_t i = 0; i < m; i += MR)
      gemm_micro<Steps, 2, kSkipZero>(a + i * a_rs, a_rs, a_cs, b + j, ldb, kd,
                                      c + i * ldc + j, ldc, accumulate);
  if (n - j == W) {
    for (int64_t i = 0; i < m; i += MR)
      gemm_micro<Steps, 1, kSkipZero>(a + i * a_rs, a_rs, a_cs, b + j, ldb, kd,
                                      c + i * ldc + j, ldc, accumulate);
  }
}
