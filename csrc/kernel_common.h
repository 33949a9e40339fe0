// Pieces shared by the prefill and decode kernels of one instruction set:
// per-thread scratch, block sums, dropout, half-precision keys and values
// (which keys a query sees is score_mask.h's).
//
// A fragment: attention_kernel.h includes it *inside* the namespace
// tileattn::<isa>, after the standard headers. Every inline function here is
// compiled with its instruction set's flags, and a function of the same name
// compiled for AVX-512 must not be merged by the linker with the AVX2 or
// baseline copy, so each copy gets its own namespace.
#pragma once

// A per-thread bump allocator over one 64-byte aligned buffer that grows on
// demand and is reused across calls, so the hot path never allocates.
class Arena {
 public:
  ~Arena() { std::free(base_); }
  // Discards earlier carvings and makes room for `bytes` (plus alignment).
  void reset(size_t bytes) {
    bytes += 64 * 16;
    if (bytes > capacity_) {
      std::free(base_);
      base_ = static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
      if (!base_) {
        capacity_ = 0;
        throw std::bad_alloc();
      }
      capacity_ = bytes;
    }
    used_ = 0;
  }
  template <typename T>
  T* carve(size_t n) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += (n * sizeof(T) + 63) / 64 * 64;
    return p;
  }

 private:
  char* base_ = nullptr;
  size_t capacity_ = 0;
  size_t used_ = 0;
};

// The operands of a micro-kernel's products and how one step of their sums
// multiplies them (the operand policy of gemm_micro and the prefill's
// micro-kernels): ElementSteps<T> takes one element of each operand per
// step, a fused multiply-add; PairSteps (kernel_bf16.h) one bf16 pair of
// each, two products summed into float32. Kernels that sum in segments
// count them in elements of the summed dimension, kPerStep per step, so
// both policies sum in the same order.
template <typename T>
struct ElementSteps {
  using Operand = T;
  using Value = T;  // of the sums
  using S = Simd<T>;
  using reg = typename S::reg;
  static constexpr int64_t kPerStep = 1;
  static constexpr bool kScaleScores = false;  // the prefill packs Q^T scaled
  static reg broadcast(T x) { return S::set1(x); }
  static reg load(const T* x) { return S::load(x); }
  static reg madd(reg acc, reg a, reg b) { return S::fmadd(a, b, acc); }
  // acc + a * b, acc kept in the lanes where b is 0 (values_micro's kSkipZero).
  static reg madd_skip_zero(reg acc, reg a, reg b) {
    return S::keep_where_zero(b, acc, S::fmadd(a, b, acc));
  }
};

// The rows of one task: query rows [i0, i0 + rows) of one (batch, head).
struct RowRange {
  int64_t b, h, hk;  // batch, query head, key/value head
  int64_t i0, rows;
};

// Dot products run as fused multiply-add chains over segments of
// kScoreSegment head dimensions (a score) or kValueSegment keys (an output
// element), the segment sums then added in order. Why: one chain over all D
// dimensions and over all of a block's keys made those products the largest
// error of the output (~1.4-2x the RMS error of a NumPy softmax, whose BLAS
// products use many partial sums, with tails past 5x). Measured, paired with
// the unsegmented kernel: 16/16 costs 2-7% of the time; 32/32 costs less but
// leaves tails at 2-3x NumPy's error at few queries.
constexpr int64_t kScoreSegment = 16;
constexpr int64_t kValueSegment = 16;

// Keys per block never exceed this (PrefillTiling caps them), so a block
// has at most kMaxBlockKeys / kSumLeaf leaves.
constexpr int64_t kMaxBlockKeys = 240;
constexpr int64_t kSumLeaf = 8;
constexpr int kMaxSumLeaves = static_cast<int>(kMaxBlockKeys / kSumLeaf);

// The sum of one block's probabilities, in a fixed pairwise order: leaves
// of kSumLeaf consecutive keys, counted from the block's first key, are
// summed in order, then neighbouring leaf sums are added level by level.
// Why: a row's sum l divides every output element, and a sequential float32
// sum over ~240 keys made it the largest rounding error of the kernel
// (output RMS error ~2.5x a plain NumPy softmax); pairwise, the error grows
// with log2(keys) instead. V is a register of lanes (prefill: one query per
// lane) or a scalar (decode); lanes do not interact, so both give each row
// the same bits. Keys before `offset` (trimmed away) are zeros: x + 0 == x
// exactly, so trimming either edge of a block changes no bit.
template <typename V, int G, typename Add>
class BlockSum {
 public:
  // G independent sums (G registers of lanes), keys from `offset` on.
  BlockSum(int64_t offset, V zero, Add add) : add_(add), next_(offset), zero_(zero) {
    for (; n_ < offset / kSumLeaf; ++n_)
      for (int g = 0; g < G; ++g) leaves_[g][n_] = zero;
  }
  // The next leaf covers keys [next(), leaf_end(limit)), relative to the
  // block's first key: up to the leaf boundary or `limit`, the keys present.
  int64_t next() const { return next_; }
  int64_t leaf_end(int64_t limit) const {
    return std::min(limit, (next_ / kSumLeaf + 1) * kSumLeaf);
  }
  // Records the sums acc[0, G) of keys [next(), end), end = leaf_end(...).
  void push(const V* acc, int64_t end) {
    for (int g = 0; g < G; ++g) leaves_[g][n_] = acc[g];
    ++n_;
    next_ = end;
  }
  V total(int g) {
    V* leaf = leaves_[g];
    if (n_ == 0) return zero_;
    for (int n = n_; n > 1;) {
      int w = 0;
      for (int i = 0; i + 1 < n; i += 2) leaf[w++] = add_(leaf[i], leaf[i + 1]);
      if (n % 2) leaf[w++] = leaf[n - 1];
      n = w;
    }
    return leaf[0];
  }

 private:
  Add add_;
  int64_t next_;
  int n_ = 0;
  V zero_;
  V leaves_[G][kMaxSumLeaves];
};

// Dropout: weight (b, h, i, j) is kept with probability 1 - p and then
// scaled by 1 / (1 - p), decided by a hash of (seed, flat index), so every
// pass (forward, weights, a backward) sees the same mask for any threads.
struct Dropout {
  double p;
  uint64_t seed;
  uint64_t lq, lk, hq;
  explicit Dropout(const AttentionParams& prm)
      : p(prm.dropout_p), seed(prm.seed), lq(prm.Lq), lk(prm.Lk), hq(prm.Hq) {}
  bool active() const { return p > 0; }
  double keep_scale() const { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }
  uint64_t row_key(int64_t b, int64_t h, int64_t i) const {
    return ((static_cast<uint64_t>(b) * hq + h) * lq + i) * lk;
  }
  bool drop(uint64_t row_key, int64_t j) const { return dropout_uniform(seed, row_key + j) < p; }
};

// Key/value storage: the compute type itself, or Half (IEEE binary16 bits),
// widened to float as the kernel reads it.
struct Half {
  uint16_t bits;
};

inline float widen(Half h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.bits);
#else
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in float
    const float f = static_cast<float>(mant) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}
// bfloat16 storage (ml_dtypes' bits): the high half of a float32, widened
// exactly by a shift.
struct Bf16 {
  uint16_t bits;
};
inline float widen(Bf16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void widen_row(const Bf16* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}
inline float widen(float x) { return x; }
inline double widen(double x) { return x; }

// dst[0, n) = src[0, n) widened; 8 at a time with F16C where compiled in.
inline void widen_row(const Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = widen(src[i]);
}

// The log-sum-exp of a row from its running max m and sum l (l = the sum
// of e^(s - m)): m + ln l, or -inf for a row that saw no key. Computed and
// kept in double whatever T, so that a backward recomputing the weights as
// e^(s - lse) loses no digits of float32 scores to lse's rounding.
template <typename T>
inline double natural_lse(T m, T l) {
  if (l == T(0)) return -std::numeric_limits<double>::infinity();
  return static_cast<double>(m) + std::log(static_cast<double>(l));
}

// A score plus an additive mask entry (both natural units: one rounding,
// as in NumPy). A -inf entry blocks the key whatever its score, even a NaN
// one.
template <typename T>
inline T add_mask(T score, T mask) {
  return mask == -std::numeric_limits<T>::infinity() ? mask : score + mask;
}

// Loops over a micro-tile's registers must be unrolled completely, or GCC
// keeps the accumulator arrays on the stack.
#define TILEATTN_UNROLL _Pragma("GCC unroll 32")

// The inner (k) loop of a micro-kernel, unrolled 4 times: fewer loop
// branches and address updates between the FMAs (paired: the projections'
// GEMM 4-7% faster, the attention forward 1-5%).
#define TILEATTN_UNROLL_STEPS _Pragma("GCC unroll 4")

// A micro-kernel compiled as a function of its own: inlined into a large
// caller, its 28 live registers compete with the caller's pointers, and GCC
// spilled one operand to the stack on every step of the loop.
#if defined(__GNUC__)
#define TILEATTN_MICRO_KERNEL __attribute__((noinline))
#else
#define TILEATTN_MICRO_KERNEL
#endif


// Keys are processed in chunks of kChunkBlocks key blocks, a property of the
// data alone. Each chunk yields a softmax state (max m, sum l, output o)
// that is merged into the running state in chunk order. Prefill merges as
// it goes; decode computes chunks in parallel and merges afterwards with
// the same arithmetic, so both give the same bits for the same row.
constexpr int64_t kChunkBlocks = 4;

// Merges W rows' chunk state (m_c, l_c) into the running (m, l); stores the
// factors by which the running and the chunk outputs are to be scaled.
template <typename T>
inline void merge_states(T* m, T* l, const T* m_c, const T* l_c, T* scale_run, T* scale_c) {
  using S = Simd<T>;
  using reg = typename S::reg;
  const reg m_old = S::load(m), mc = S::load(m_c);
  const reg m_new = S::max(m_old, mc);
  const reg m_use = S::max(m_new, S::set1(std::numeric_limits<T>::lowest()));
  const reg a = vec_exp_diff<S>(m_old, m_use);
  const reg c = vec_exp_diff<S>(mc, m_use);
  S::store(l, S::fmadd(S::load(l), a, S::mul(S::load(l_c), c)));
  S::store(m, m_new);
  S::store(scale_run, a);
  S::store(scale_c, c);
}

// o = o * a + o_c * c over n values (a multiple of W).
template <typename T>
inline void merge_rows(T* o, T a, const T* o_c, T c, int64_t n) {
  using S = Simd<T>;
  const typename S::reg va = S::set1(a), vc = S::set1(c);
  for (int64_t e = 0; e < n; e += S::W)
    S::store(o + e, S::fmadd(S::load(o + e), va, S::mul(S::load(o_c + e), vc)));
}
