// The tiled attention forward for blocks of queries (prefill, training,
// encoders). A fragment included inside tileattn::<isa> after
// kernel_common.h; Simd<T> comes from that ISA's simd_<isa>.h.
//
// One task = BR query rows of one (batch, head). It keeps Q^T of its rows
// (scaled by scale: the scores come out in natural units), then for each
// block of bc keys that its causal/window span reaches:
//   S^T = K Q^T      (bc x BR)  register-blocked, K read in place;
//   mask S^T         only where a mask can hide something (score_mask.h);
//   fold S^T into each query's running (max, sum); O^T *= alpha;
//   O^T += V^T P^T   (Dv x BR)  P^T read in place, V in place when its
//                               rows are unit-stride (else copied into rows).
// Everything is kept transposed (queries along SIMD lanes): the softmax runs
// across lanes with no horizontal reductions, the rescale is one vector
// multiply, and neither product needs its big operand repacked.
// The Lq x Lk score matrix never exists: scratch is O(BR x bc) per thread.
//
// Tile sizes depend only on the instruction set, dtype and head sizes,
// never on the thread count, and a row's key blocks start at multiples of
// bc: every row is computed by the same operations whatever the scheduling
// or the rest of the batch, so results are bitwise reproducible.

template <typename T>
struct PrefillTiling {
  using S = Simd<T>;
  static constexpr int W = S::W;
  static constexpr int MR = S::MR;       // broadcast rows per micro-tile (keys / value dims)
  static constexpr int NR = S::NV * W;   // query lanes per micro-tile
  static constexpr int BR = 96;          // query rows per task
  static_assert(BR % NR == 0 && 24 % MR == 0, "BR must hold whole strips; MR must divide 24");

  int64_t d, dv, dvp, bc;
  bool k_direct;  // read K in place (else copy each block)
  bool v_direct;  // read V in place (else copy each block into rows of dvp)
  // bf16 products (kernel_prefill_bf16.h), K and V converted once per call:
  // into pairs for the bf16 dot product (pairs), or rounded to bf16 values
  // in float32 for the widened method (round_bf16: the float32 kernel on
  // rounded operands, q and P rounded as they are formed).
  bool pairs, round_bf16;

  // kv_rounded: K and V already hold bf16 values (RoundedOperands).
  explicit PrefillTiling(const AttentionParams& p, bool kv_rounded = false)
      : d(p.D), dv(p.Dv),
        pairs(p.products == Products::bf16 && Simd<float>::kBf16Dot),
        round_bf16(p.products == Products::bf16 && !Simd<float>::kBf16Dot) {
    dvp = round_up(std::max<int64_t>(dv, 1), MR);
    // K and V of one block (bc * (d + dvp) values) take about 192 KiB,
    // leaving room in a 512 KiB L2 for Q^T, S^T and O^T.
    const int64_t bytes_per_key = (pairs ? 2 : static_cast<int64_t>(sizeof(T))) * (d + dvp);
    const int64_t keys = (192 * 1024) / std::max<int64_t>(bytes_per_key, 1);
    bc = std::max<int64_t>(24, std::min<int64_t>(kMaxBlockKeys, keys) / 24 * 24);
    k_direct = p.k_stride.c == 1 && !p.kv_narrow();
    // A unit-stride V row already holds each panel's MR values of a key
    // side by side: the panels are V itself, with the row stride as the
    // key step. Copying it cost every (query block, key block) a copy of
    // the block (~5% of the time at D = 64). Its rows must hold dvp
    // values (the last panel reads them all).
    v_direct = p.v_stride.c == 1 && !p.kv_narrow() && dv % MR == 0;
    if (pairs) k_direct = v_direct = true;  // the converted pairs, in place
    // Otherwise rounded as each block is copied (see prefill_forward_items_bf16).
    if (round_bf16 && !kv_rounded) k_direct = v_direct = false;
  }
  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
};

template <typename T>
struct PrefillScratch {
  T *qt, *kbuf, *ktail, *vp, *st;
  T *ot, *m, *l, *alpha;               // state of the chunk being computed
  T *ot_run, *m_run, *l_run, *scale_c;  // state merged over finished chunks
  T* colmax;                            // per-query max of the block's scores
  uint8_t* visible;
  Bf16Pair *qt2 = nullptr, *pt2 = nullptr, *ktail2 = nullptr, *rows2 = nullptr;  // bf16 only

  PrefillScratch(Arena& a, const PrefillTiling<T>& t) {
    using Tl = PrefillTiling<T>;
    constexpr size_t BR = Tl::BR;
    const size_t n_qt = BR * t.d, n_k = t.k_direct ? 0 : t.bc * t.d;
    const size_t n_v = t.v_direct ? 0 : t.bc * t.dvp, n_st = t.bc * BR, n_o = t.dvp * BR;
    const size_t n_tail = Tl::MR * std::max<int64_t>(t.d, 1);
    const size_t dp = static_cast<size_t>(t.d + 1) / 2;
    const size_t dpw = (dp + Tl::W - 1) / Tl::W * Tl::W;
    const size_t n_pairs =
        t.pairs ? dp * BR + (t.bc / 2 + 1) * BR + Tl::MR * std::max<size_t>(dp, 1) + Tl::W * dpw
                : 0;
    a.reset(sizeof(T) * (n_qt + n_k + n_tail + n_v + n_st + 2 * n_o + 8 * BR) + t.bc +
            sizeof(Bf16Pair) * n_pairs + 4 * 64);
    qt = a.carve<T>(n_qt);
    kbuf = a.carve<T>(n_k);
    ktail = a.carve<T>(n_tail);
    vp = a.carve<T>(n_v);
    st = a.carve<T>(n_st);
    ot = a.carve<T>(n_o);
    ot_run = a.carve<T>(n_o);
    m = a.carve<T>(BR);
    l = a.carve<T>(BR);
    alpha = a.carve<T>(BR);
    m_run = a.carve<T>(BR);
    l_run = a.carve<T>(BR);
    scale_c = a.carve<T>(BR);
    colmax = a.carve<T>(BR);
    visible = a.carve<uint8_t>(t.bc);
    if (t.pairs) {
      qt2 = a.carve<Bf16Pair>(dp * BR);
      pt2 = a.carve<Bf16Pair>((t.bc / 2 + 1) * BR);
      ktail2 = a.carve<Bf16Pair>(Tl::MR * std::max<size_t>(dp, 1));
      rows2 = a.carve<Bf16Pair>(Tl::W * dpw);
    }
  }
};

// ---------------------------------------------------------------------------
// Operands.

// qt[x][i] (row stride BR) = q[i0 + i][x] * factor, zero for padding rows;
// with t.round_bf16, q rounded to bf16 first.
template <typename T>
void pack_query_transposed(const AttentionParams& p, const PrefillTiling<T>& t,
                           const RowRange& rr, int64_t qcols, T factor, T* qt) {
  const auto value = [&t](T x) {
    if constexpr (std::is_same_v<T, float>)
      return t.round_bf16 ? bf16_value(x) : x;
    else
      return x;
  };
  constexpr int BR = PrefillTiling<T>::BR;
  using S = Simd<T>;
  constexpr int W = S::W;
  const T* q = static_cast<const T*>(p.q) + rr.b * p.q_stride.b + rr.h * p.q_stride.h +
               rr.i0 * p.q_stride.r;
  // Whole W x W tiles of unit-stride rows by register transposes (element
  // by element this copy was ~2% of the time at L = 1024, D = 64: one
  // scalar store per element), the rest below one by one.
  const int64_t rows_w = p.q_stride.c == 1 ? rr.rows / W * W : 0, d_w = t.d / W * W;
  const typename S::reg f = S::set1(factor);
  alignas(64) T tile[W * W];
  for (int64_t i = 0; i < rows_w; i += W)
    for (int64_t x = 0; x < d_w; x += W) {
      S::transpose_tile(q + i * p.q_stride.r + x, p.q_stride.r, tile);  // tile[c] = column x + c
      for (int c = 0; c < W; ++c) {
        typename S::reg column = S::load(tile + c * W);
        if constexpr (std::is_same_v<T, float>)
          if (t.round_bf16) column = S::bf16_values(column);
        S::store(qt + (x + c) * BR + i, S::mul(column, f));
      }
    }
  for (int64_t i = 0; i < rows_w; ++i) {
    const T* src = q + i * p.q_stride.r;
    for (int64_t x = d_w; x < t.d; ++x) qt[x * BR + i] = value(src[x]) * factor;
  }
  for (int64_t i = rows_w; i < qcols; ++i) {
    if (i < rr.rows) {
      const T* src = q + i * p.q_stride.r;
      for (int64_t x = 0; x < t.d; ++x) qt[x * BR + i] = value(src[x * p.q_stride.c]) * factor;
    } else {
      for (int64_t x = 0; x < t.d; ++x) qt[x * BR + i] = T(0);
    }
  }
}

// A value as the products read it: widened, and rounded to bf16 when asked
// (the widened method of bf16 products, PrefillTiling::round_bf16).
template <typename T, typename KV>
inline T operand(KV x, bool round_bf16) {
  if constexpr (std::is_same_v<T, float>)
    return round_bf16 ? bf16_value(widen(x)) : widen(x);
  else
    return static_cast<T>(widen(x));
}

// Rows [0, n) of a strided (rows, cols) slice into dst (row stride ld),
// zero-filling rows [n, n_padded) and columns [cols, ld).
template <typename T, typename KV>
void copy_rows(const KV* src, int64_t sr, int64_t sc, int64_t n, int64_t n_padded, int64_t cols,
               int64_t ld, T* dst, bool round_bf16 = false) {
  for (int64_t j = 0; j < n_padded; ++j) {
    T* row = dst + j * ld;
    int64_t c = 0;
    if (j < n) {
      if constexpr (std::is_same_v<T, float> && std::is_same_v<KV, float>) {
        if (round_bf16 && sc == 1)
          for (; c + Simd<T>::W <= cols; c += Simd<T>::W)
            Simd<T>::storeu(row + c, Simd<T>::bf16_values(Simd<T>::loadu(src + j * sr + c)));
      }
      for (; c < cols; ++c) row[c] = operand<T>(src[j * sr + c * sc], round_bf16);
    }
    for (; c < ld; ++c) row[c] = T(0);
  }
}

// ---------------------------------------------------------------------------
// Micro-kernels: MR broadcast rows by NV registers (NV * W lanes) of
// queries; NV = Simd::NV except in a task's last strip, which takes only the
// registers its rows need (1 .. NV). A lane's arithmetic is the same
// whatever NV, so the bits do not depend on where a row falls.

// Rows per pass of a micro-tile, and where a pass keeps the totals of its
// segment sums. In registers when two sets of rows x NV accumulators, NV
// operands and a broadcast fit (AVX-512: passes of 4 rows): with the
// totals in memory every segment ended in a load, add and store of each
// accumulator, and the stores (one 512-bit store per cycle) cost ~10% of
// each product. Passes of fewer than 4 rows would be bound by their loads,
// so with 16 registers (AVX2, baseline) a pass takes all MR rows and keeps
// the totals in memory.
constexpr int pass_registers(int rows, int nv) { return 2 * rows * nv + nv + 1; }
template <typename T, int NV>
constexpr int rows_per_pass() {
  int rows = Simd<T>::MR;
  while (rows > 4 && pass_registers(rows, NV) > Simd<T>::kRegisters) rows /= 2;
  return rows;
}
template <typename T, int NV>
constexpr bool totals_in_registers() {
  return pass_registers(rows_per_pass<T, NV>(), NV) <= Simd<T>::kRegisters;
}

// st[MR][NR] (row stride lds) = k[MR][d] (row stride ldk) . qt[d][NR] (row
// stride ldq): MR keys against NR queries, over `steps` steps of the
// policy (d elements). With Steps::kScaleScores the sums are then
// multiplied by `scale`. With kColMax, also folds the tile's per-query
// maximum into colmax[NR], sparing the softmax a pass.
// The dot products run in segments of kScoreSegment (see there), each
// from zero, added in order to the total of the earlier ones.
template <typename Steps, int NV, bool kColMax>
TILEATTN_MICRO_KERNEL void scores_micro(const typename Steps::Operand* k, int64_t ldk,
                                        const typename Steps::Operand* qt, int64_t ldq,
                                        int64_t steps, typename Steps::Value scale,
                                        typename Steps::Value* st, int64_t lds,
                                        typename Steps::Value* colmax) {
  using S = typename Steps::S;
  using T = typename Steps::Value;
  using reg = typename S::reg;
  constexpr int MR = S::MR, W = S::W, MH = rows_per_pass<T, NV>();
  constexpr bool kInRegisters = totals_in_registers<T, NV>();
  constexpr int64_t kSegment = kScoreSegment / Steps::kPerStep;
  for (int r0 = 0; r0 < MR; r0 += MH) {
    const typename Steps::Operand* kr = k + r0 * ldk;
    T* sr = st + r0 * lds;
    reg total[MH][NV];
    for (int64_t x0 = 0; x0 == 0 || x0 < steps; x0 += kSegment) {
      const int64_t x1 = std::min(steps, x0 + kSegment);
      reg acc[MH][NV];
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) acc[r][c] = S::zero();
      TILEATTN_UNROLL_STEPS
      for (int64_t x = x0; x < x1; ++x) {
        reg b[NV];
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) b[c] = Steps::load(qt + x * ldq + c * W);
        TILEATTN_UNROLL
        for (int r = 0; r < MH; ++r) {
          const reg a = Steps::broadcast(kr[r * ldk + x]);
          TILEATTN_UNROLL
          for (int c = 0; c < NV; ++c) acc[r][c] = Steps::madd(acc[r][c], a, b[c]);
        }
      }
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) {
          T* dst = sr + r * lds + c * W;
          if (x0 == 0)
            total[r][c] = acc[r][c];
          else
            total[r][c] = S::add(kInRegisters ? total[r][c] : S::load(dst), acc[r][c]);
          if (!kInRegisters) S::store(dst, total[r][c]);
        }
    }
    if (kInRegisters || Steps::kScaleScores) {
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) {
          if (!kInRegisters) total[r][c] = S::load(sr + r * lds + c * W);
          if (Steps::kScaleScores) total[r][c] = S::mul(total[r][c], S::set1(scale));
          S::store(sr + r * lds + c * W, total[r][c]);
        }
    }
    if (kColMax) {
      TILEATTN_UNROLL
      for (int c = 0; c < NV; ++c) {
        reg mx = S::load(colmax + c * W);
        TILEATTN_UNROLL
        for (int r = 0; r < MH; ++r) mx = S::max(mx, total[r][c]);
        S::store(colmax + c * W, mx);
      }
    }
  }
}

// ot[MR][NR] (row stride ldo) += vp[j][MR]^T . pt[j][NR] (row strides ldv,
// ldp) over steps j < n: MR value columns by NR queries (the output,
// transposed). Step j is the block's step offset + j; the sum runs in
// segments of kValueSegment keys counted from the block's first key, each
// from zero and then added to ot, so a trimmed block (whose missing keys
// have p = 0) gives the same bits as the whole one, and the decode path
// can follow the same order.
// With kSkipZero, lanes whose probability is 0 keep their sum instead of
// adding 0 * v: identical for finite v, and a NaN or inf in the value of a
// key a query cannot see stays out of that query's output.
// With `rescale` (NV * W lanes), ot is first multiplied by it lane by lane:
// the online softmax's alpha, applied as ot is read rather than in a pass
// of its own over O^T (the same product, so the same bits). n >= 1 (with
// the totals in memory, the first segment applies it). The factors are
// read where they are applied, not held in registers through the loop:
// with them held, GCC spilled an operand of the pairs' loop to the stack
// on every step (perf annotate).
template <typename Steps, int NV, bool kSkipZero>
TILEATTN_MICRO_KERNEL void values_micro(const typename Steps::Operand* vp, int64_t ldv,
                                        const typename Steps::Operand* pt, int64_t ldp,
                                        int64_t n, int64_t offset, typename Steps::Value* ot,
                                        int64_t ldo, const typename Steps::Value* rescale) {
  using S = typename Steps::S;
  using T = typename Steps::Value;
  using reg = typename S::reg;
  constexpr int MR = S::MR, W = S::W, MH = rows_per_pass<T, NV>();
  constexpr bool kInRegisters = totals_in_registers<T, NV>();
  constexpr int64_t kSegment = kValueSegment / Steps::kPerStep;
  const auto read_ot = [&](const T* src, int c, bool first) {
    return rescale && first ? S::mul(S::load(src), S::load(rescale + c * W)) : S::load(src);
  };
  for (int r0 = 0; r0 < MR; r0 += MH) {
    T* o = ot + r0 * ldo;
    reg total[MH][NV];  // ot itself, then ot + each segment's sum in turn
    if (kInRegisters) {
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) total[r][c] = read_ot(o + r * ldo + c * W, c, true);
    }
    for (int64_t j0 = 0; j0 < n;) {
      const int64_t j1 = std::min(n, ((offset + j0) / kSegment + 1) * kSegment - offset);
      reg acc[MH][NV];
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) acc[r][c] = S::zero();
      TILEATTN_UNROLL_STEPS
      for (int64_t j = j0; j < j1; ++j) {
        reg b[NV];
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) b[c] = Steps::load(pt + j * ldp + c * W);
        TILEATTN_UNROLL
        for (int r = 0; r < MH; ++r) {
          const reg a = Steps::broadcast(vp[j * ldv + r0 + r]);
          TILEATTN_UNROLL
          for (int c = 0; c < NV; ++c) {
            if (kSkipZero)
              acc[r][c] = Steps::madd_skip_zero(acc[r][c], a, b[c]);
            else
              acc[r][c] = Steps::madd(acc[r][c], a, b[c]);
          }
        }
      }
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) {
          T* dst = o + r * ldo + c * W;
          if (kInRegisters)
            total[r][c] = S::add(total[r][c], acc[r][c]);
          else
            S::store(dst, S::add(read_ot(dst, c, j0 == 0), acc[r][c]));
        }
      j0 = j1;
    }
    if (kInRegisters) {
      TILEATTN_UNROLL
      for (int r = 0; r < MH; ++r)
        TILEATTN_UNROLL
        for (int c = 0; c < NV; ++c) S::store(o + r * ldo + c * W, total[r][c]);
    }
  }
}

// Calls fn(i, std::integral_constant<int, nv>) for each strip of query
// lanes [i, i + nv * W) of [0, qcols) (qcols a multiple of W): whole strips
// of Simd::NV registers, then one of the registers left, so a task of 32
// rows computes 32 lanes, not a padded 48.
template <typename T, typename Fn>
inline void for_each_strip(int64_t qcols, Fn&& fn) {
  constexpr int NV = Simd<T>::NV, W = Simd<T>::W;
  static_assert(NV <= 3, "strip dispatch covers up to 3 registers");
  int64_t i = 0;
  for (; i + NV * W <= qcols; i += NV * W) fn(i, std::integral_constant<int, NV>());
  const int64_t rest = (qcols - i) / W;
  if (rest == 2) fn(i, std::integral_constant<int, (NV > 2 ? 2 : 1)>());
  if (rest == 1) fn(i, std::integral_constant<int, 1>());
}

// S^T (cols x qcols, row stride BR) = K[j0 : j0 + cols] Q^T (qt: Q^T in
// the policy's operands, rows of BR), scaled by `scale` where the policy
// scales scores. Whole micro-tiles read K in place; the last partial one
// reads a zero-padded copy (ktail, MR rows). Query strips are the outer
// loop so that one strip of Q^T (d x NR) stays in L1 while the block's
// keys stream past it from L2.
template <typename T, typename Steps = ElementSteps<T>>
void block_scores(const PrefillTiling<T>& t, const typename Steps::Operand* k, int64_t ldk,
                  int64_t cols, int64_t qcols, bool col_max, const typename Steps::Operand* qt,
                  typename Steps::Operand* ktail, T scale, PrefillScratch<T>& sc) {
  using Tl = PrefillTiling<T>;
  using S = Simd<T>;
  using Operand = typename Steps::Operand;
  constexpr int MR = Tl::MR, BR = Tl::BR, W = Tl::W;
  const int64_t steps = (t.d + Steps::kPerStep - 1) / Steps::kPerStep;
  const int64_t full = cols / MR * MR;
  if (full < cols) {
    std::fill(ktail, ktail + MR * steps, Operand{});
    for (int64_t j = full; j < cols; ++j)
      std::copy(k + j * ldk, k + j * ldk + steps, ktail + (j - full) * steps);
  }
  if (col_max) std::fill(sc.colmax, sc.colmax + qcols, -std::numeric_limits<T>::infinity());
  for_each_strip<T>(qcols, [&](int64_t i, auto nv) {
    constexpr int NV = decltype(nv)::value;
    for (int64_t j = 0; j < full; j += MR) {
      if (col_max)
        scores_micro<Steps, NV, true>(k + j * ldk, ldk, qt + i, BR, steps, scale,
                                      sc.st + j * BR + i, BR, sc.colmax + i);
      else
        scores_micro<Steps, NV, false>(k + j * ldk, ldk, qt + i, BR, steps, scale,
                                       sc.st + j * BR + i, BR, nullptr);
    }
    if (full < cols) {
      scores_micro<Steps, NV, false>(ktail, steps, qt + i, BR, steps, scale,
                                     sc.st + full * BR + i, BR, nullptr);
      if (col_max)  // only the real keys of the zero-padded tail tile
        for (int64_t j = full; j < cols; ++j)
          for (int64_t c = i; c < i + NV * W; c += W)
            S::store(sc.colmax + c, S::max(S::load(sc.colmax + c), S::load(sc.st + j * BR + c)));
    }
  });
}

// O^T (dvp x qcols, row stride BR) = O^T * alpha + V^T P^T over the
// block's n steps of keys (offset: the block's first step within its block
// of bc keys), P^T read from pt (rows of BR), alpha (sc.alpha) applied as
// the first sub-block reads O^T.
// Panel e (value columns e .. e + MR) starts at v + e and steps ldv from
// step to step: V in place (ldv: its row stride) or a copy in rows of dvp.
// Query strips are the outer loop, then sub-blocks of kValueSubBlock keys:
// the sub-block's strip of P^T (64 x NR, 12 KiB) and the V lines it meets
// stay in L1 while every panel of V passes. Over a whole block (240 x NR,
// 46 KiB) the strip did not fit beside V, and each panel read P^T again
// from L2 (64-key sub-blocks: 3-7% faster at D = 64). Sub-blocks start at
// multiples of kValueSegment, and values_micro adds each segment to ot in
// order whether the running total stays in registers or goes through ot:
// the bits are those of one pass over the block.
constexpr int64_t kValueSubBlock = 64;
static_assert(kValueSubBlock % kValueSegment == 0, "sub-blocks hold whole value segments");
template <typename T, typename Steps = ElementSteps<T>>
void block_values(const PrefillTiling<T>& t, const typename Steps::Operand* v, int64_t ldv,
                  int64_t n, int64_t offset, int64_t qcols, bool finite_values,
                  const typename Steps::Operand* pt_block, PrefillScratch<T>& sc) {
  using Tl = PrefillTiling<T>;
  constexpr int MR = Tl::MR, BR = Tl::BR;
  constexpr int64_t kSub = kValueSubBlock / Steps::kPerStep;
  for_each_strip<T>(qcols, [&](int64_t i, auto nv) {
    constexpr int NV = decltype(nv)::value;
    for (int64_t j0 = 0; j0 < n;) {
      const int64_t j1 = std::min(n, ((offset + j0) / kSub + 1) * kSub - offset);
      const typename Steps::Operand* pt = pt_block + j0 * BR + i;
      const T* rescale = j0 == 0 ? sc.alpha + i : nullptr;
      for (int64_t e = 0; e < t.dvp; e += MR) {
        const typename Steps::Operand* panel = v + e + j0 * ldv;
        T* ot = sc.ot + e * BR + i;
        if (finite_values)
          values_micro<Steps, NV, false>(panel, ldv, pt, BR, j1 - j0, offset + j0, ot, BR,
                                         rescale);
        else
          values_micro<Steps, NV, true>(panel, ldv, pt, BR, j1 - j0, offset + j0, ot, BR,
                                        rescale);
      }
      j0 = j1;
    }
  });
}

// Whether x[0, n) are all finite: x * 0 is 0 for finite x and NaN otherwise.
// Unaligned loads: x may be the caller's V rows (v_direct). Four sums, so
// that the additions' latency does not bound the loop: with one, this check
// of each V block was ~4% of the forward's time at D = 64.
template <typename T>
bool all_finite(const T* x, int64_t n) {
  using S = Simd<T>;
  constexpr int W = S::W;
  using reg = typename S::reg;
  reg acc[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
  const reg zero = S::zero();
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W)
    TILEATTN_UNROLL
    for (int a = 0; a < 4; ++a) acc[a] = S::add(acc[a], S::mul(S::loadu(x + i + a * W), zero));
  for (; i + W <= n; i += W) acc[0] = S::add(acc[0], S::mul(S::loadu(x + i), zero));
  T tail = T(0);
  for (; i < n; ++i) tail = tail + x[i] * T(0);
  return S::hsum(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]))) + tail == T(0);
}

// Whether the rows x[j][0, n) (row stride ld) for j < rows are all finite.
template <typename T>
bool rows_finite(const T* x, int64_t ld, int64_t rows, int64_t n) {
  if (ld == n) return all_finite<T>(x, rows * n);
  for (int64_t j = 0; j < rows; ++j)
    if (!all_finite<T>(x + j * ld, n)) return false;
  return true;
}

// Whether each key block of V is all finite, found once per call by the
// first task that needs it: every query block of a head reads the same V
// blocks, and the check is a pass over the block (from L2: ~3% of the time
// at L = 1024 when each task repeated it). A flag is a pure function of V,
// so racing tasks store the same value; it only picks between two P V
// kernels that give the same bits for finite values. Whole blocks are
// checked, a superset of a trimmed block's keys (a non-finite value of a
// key outside the span only costs the zero-skipping kernel).
class FiniteBlocks {
 public:
  FiniteBlocks(const AttentionParams& p, int64_t bc)
      : bc_(bc), blocks_((p.Lk + bc - 1) / bc), kv_heads_(p.Hkv > 0 ? p.Hkv : p.Hq) {
    const int64_t n = std::max<int64_t>(p.B * kv_heads_ * blocks_, 1);
    flags_.reset(new std::atomic<uint8_t>[n]);
    for (int64_t i = 0; i < n; ++i) flags_[i].store(kUnknown, std::memory_order_relaxed);
  }
  // v: KV head hk of batch item b (rows of stride ld, dv values each, lk
  // rows in all); j0: a key of the block.
  template <typename T>
  bool finite(int64_t b, int64_t hk, int64_t j0, const T* v, int64_t ld, int64_t lk, int64_t dv) {
    const int64_t blk = j0 / bc_;
    std::atomic<uint8_t>& f = flags_[(b * kv_heads_ + hk) * blocks_ + blk];
    uint8_t s = f.load(std::memory_order_relaxed);
    if (s == kUnknown) {
      const int64_t first = blk * bc_;
      const bool ok = rows_finite<T>(v + first * ld, ld, std::min(bc_, lk - first), dv);
      s = ok ? kFinite : kNotFinite;
      f.store(s, std::memory_order_relaxed);
    }
    return s == kFinite;
  }
  // The flag of the block holding key j0 recorded by whoever read V first
  // (bf16 products: Bf16Operands, while converting it), and read back.
  void record(int64_t b, int64_t hk, int64_t j0, bool finite) {
    flags_[(b * kv_heads_ + hk) * blocks_ + j0 / bc_].store(finite ? kFinite : kNotFinite,
                                                           std::memory_order_relaxed);
  }
  bool recorded_finite(int64_t b, int64_t hk, int64_t j0) const {
    return flags_[(b * kv_heads_ + hk) * blocks_ + j0 / bc_].load(std::memory_order_relaxed) ==
           kFinite;
  }

 private:
  static constexpr uint8_t kUnknown = 0, kFinite = 1, kNotFinite = 2;
  int64_t bc_, blocks_, kv_heads_;
  std::unique_ptr<std::atomic<uint8_t>[]> flags_;
};

// ---------------------------------------------------------------------------
// The online softmax update, the one piece every tiled variant is built on,
// here for G registers of queries at once (G * W lanes). Folds the block's
// scores st[j][lanes] (j < cols, row stride ld; key j is the block's key
// offset + j) into the running max m and sum l of those queries, overwrites
// st with e^(s - m_new) (vec_exp_diff), and stores
// in alpha the factor by which each query's output so far must be scaled.
// A query that has seen only -inf keeps m = -inf and l = 0 and gets p = 0
// (the max with -FLT_MAX below keeps -inf - -inf from making NaN). The
// passes walk st row by row, G registers wide, so each row's cache lines
// are read once per pass. Each lane's arithmetic does not depend on G.
// With bf16 products (float lanes; `out` other than exact) the exponentials
// are formed to bf16 accuracy (vec_exp_diff_bf16) and l sums them
// unrounded; they are written to st unrounded (dropout comes next, then the
// rounding), to st rounded to bf16 values (the widened method's P), or
// rounded in pairs of keys to pt2 (pairs j / 2, row stride ld).
enum class ProbOut : int { exact, bf16_unrounded, bf16_values, bf16_pairs };

template <typename T, int G>
inline void online_softmax_update(T* st, int64_t ld, int64_t cols, int64_t offset, T* m, T* l,
                                  T* alpha, const T* colmax, ProbOut out = ProbOut::exact,
                                  Bf16Pair* pt2 = nullptr) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int W = S::W;
  reg mx[G], mu[G];
  if (colmax) {  // the maximum came with the scores (max is exact in any order)
    TILEATTN_UNROLL
    for (int g = 0; g < G; ++g) mx[g] = S::load(colmax + g * W);
  } else {
    TILEATTN_UNROLL
    for (int g = 0; g < G; ++g) mx[g] = S::set1(-std::numeric_limits<T>::infinity());
    for (int64_t j = 0; j < cols; ++j)
      TILEATTN_UNROLL
      for (int g = 0; g < G; ++g) mx[g] = S::max(mx[g], S::load(st + j * ld + g * W));
  }
  TILEATTN_UNROLL
  for (int g = 0; g < G; ++g) {
    const reg m_old = S::load(m + g * W);
    const reg m_new = S::max(m_old, mx[g]);
    mu[g] = S::max(m_new, S::set1(std::numeric_limits<T>::lowest()));
    S::store(alpha + g * W, vec_exp_diff<S>(m_old, mu[g]));
    S::store(m + g * W, m_new);
  }
  // The exponentials, summed leaf by leaf in BlockSum's fixed order.
  const auto add = [](reg a, reg b) { return S::add(a, b); };
  BlockSum<reg, G, decltype(add)> sums(offset, S::zero(), add);
  while (sums.next() < offset + cols) {
    const int64_t j_begin = sums.next() - offset;
    const int64_t j_end = sums.leaf_end(offset + cols) - offset;
    reg acc[G];
    TILEATTN_UNROLL
    for (int g = 0; g < G; ++g) acc[g] = S::zero();
    if constexpr (std::is_same_v<T, float>) {
      if (out == ProbOut::bf16_unrounded || out == ProbOut::bf16_values) {
        const bool round = out == ProbOut::bf16_values;
        for (int64_t j = j_begin; j < j_end; ++j) {
          TILEATTN_UNROLL
          for (int g = 0; g < G; ++g) {
            T* p0 = st + j * ld + g * W;
            const reg e = vec_exp_diff_bf16<S>(S::load(p0), mu[g]);
            S::store(p0, round ? S::bf16_values(e) : e);
            acc[g] = S::add(acc[g], e);
          }
        }
        sums.push(acc, offset + j_end);
        continue;
      }
      if (out == ProbOut::bf16_pairs) {  // leaves start at even keys: pairs (j, j + 1) of one leaf
        for (int64_t j = j_begin; j < j_end; j += 2) {
          TILEATTN_UNROLL
          for (int g = 0; g < G; ++g) {
            const reg e0 = vec_exp_diff_bf16<S>(S::load(st + j * ld + g * W), mu[g]);
            acc[g] = S::add(acc[g], e0);
            reg e1 = S::zero();
            if (j + 1 < j_end) {
              e1 = vec_exp_diff_bf16<S>(S::load(st + (j + 1) * ld + g * W), mu[g]);
              acc[g] = S::add(acc[g], e1);
            }
            S::store(reinterpret_cast<float*>(pt2 + (j / 2) * ld + g * W),
                     S::bf16_round_pairs(e0, e1));
          }
        }
        sums.push(acc, offset + j_end);
        continue;
      }
    }
    for (int64_t j = j_begin; j < j_end; ++j) {
      TILEATTN_UNROLL
      for (int g = 0; g < G; ++g) {
        T* p0 = st + j * ld + g * W;
        const reg e = vec_exp_diff_unclamped<S>(S::load(p0), mu[g]);
        S::store(p0, e);
        acc[g] = S::add(acc[g], e);
      }
    }
    sums.push(acc, offset + j_end);
  }
  TILEATTN_UNROLL
  for (int g = 0; g < G; ++g)
    S::store(l + g * W, S::fmadd(S::load(l + g * W), S::load(alpha + g * W), sums.total(g)));
}

// The update for lanes [0, qcols) of a block, a strip of registers at a
// time (qcols is a multiple of W).
// out, pt2: as online_softmax_update's.
template <typename T>
void block_softmax(T* st, int64_t ld, int64_t cols, int64_t offset, int64_t qcols, T* m, T* l,
                   T* alpha, const T* colmax, ProbOut out = ProbOut::exact,
                   Bf16Pair* pt2 = nullptr) {
  for_each_strip<T>(qcols, [&](int64_t i, auto nv) {
    online_softmax_update<T, decltype(nv)::value>(st + i, ld, cols, offset, m + i, l + i,
                                                  alpha + i, colmax ? colmax + i : nullptr, out,
                                                  pt2 ? pt2 + i : nullptr);
  });
}

// st's probabilities (cols x qcols) rounded to bf16 values in place.
template <typename T>
void round_probabilities(T* st, int64_t cols, int64_t qcols) {
  using S = Simd<T>;
  constexpr int BR = PrefillTiling<T>::BR;
  if constexpr (std::is_same_v<T, float>)
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = 0; i < qcols; i += S::W)
        S::store(st + j * BR + i, S::bf16_values(S::load(st + j * BR + i)));
}

// Applies dropout to the block's probabilities (transposed, in st).
template <typename T>
void dropout_block(const Dropout& dr, const RowRange& rr, int64_t j0, int64_t cols, T* st) {
  constexpr int BR = PrefillTiling<T>::BR;
  const T keep = static_cast<T>(dr.keep_scale());
  for (int64_t i = 0; i < rr.rows; ++i) {
    const uint64_t key = dr.row_key(rr.b, rr.h, rr.i0 + i);
    for (int64_t jj = 0; jj < cols; ++jj) {
      T& w = st[jj * BR + i];
      w = dr.drop(key, j0 + jj) ? T(0) : w * keep;
    }
  }
}

#include "kernel_prefill_bf16.h"

// K and V of one KV head rounded to bf16 values (rows of d and dvp): the
// widened bf16 method's operands when each head is one task of its few
// query blocks (prefill_forward_items_bf16). The first query block to
// reach a block of keys rounds all of it (and records whether its V is
// finite); the head's other query blocks read it in place.
template <typename T>
struct RoundedHead {
  T *k, *v;
  std::vector<uint8_t> state;  // per block of bc keys: 0 not yet, 1 finite V, 2 not

  RoundedHead(Arena& a, const AttentionParams& p, const PrefillTiling<T>& t)
      : state(static_cast<size_t>((p.Lk + t.bc - 1) / t.bc), 0) {
    a.reset(sizeof(T) * static_cast<size_t>(p.Lk * (t.d + t.dvp)) + 128);
    k = a.carve<T>(static_cast<size_t>(p.Lk * t.d));
    v = a.carve<T>(static_cast<size_t>(p.Lk * t.dvp));
  }
  static size_t bytes(const AttentionParams& p, const PrefillTiling<T>& t) {
    return sizeof(T) * static_cast<size_t>(p.Lk * (t.d + t.dvp));
  }

  // The block holding key j0 of k_head, v_head (strides of p), rounded.
  template <typename KV>
  void ensure(const AttentionParams& p, const PrefillTiling<T>& t, const KV* k_head,
              const KV* v_head, int64_t j0) {
    const int64_t blk = j0 / t.bc, first = blk * t.bc, n = std::min(t.bc, p.Lk - first);
    if (state[blk]) return;
    round_kv_rows<T, KV>(p, k_head, v_head, first, n, k + first * t.d, t.d, v + first * t.dvp,
                         t.dvp);
    state[blk] = all_finite<T>(v + first * t.dvp, n * t.dvp) ? 1 : 2;
  }
  bool finite(int64_t j0, int64_t bc) const { return state[j0 / bc] == 1; }
};

// ---------------------------------------------------------------------------
// One task.

// KV = Bf16Pair: bf16 products, K and V the call's converted pairs
// (Bf16Operands), q float32.
template <typename T, typename KV>
struct PrefillTask {
  using Tl = PrefillTiling<T>;
  using S = Simd<T>;
  static constexpr int BR = Tl::BR, W = Tl::W;
  static constexpr bool kPairs = std::is_same_v<KV, Bf16Pair>;
  const AttentionParams& p;
  const Tl& t;
  const RowRange& rr;
  PrefillScratch<T>& sc;
  FiniteBlocks& finite_v;
  ScoreMask<T> mask;
  Dropout dr;
  int64_t qcols;
  const KV* k_head;
  const KV* v_head;
  RoundedHead<T>* head;  // K and V of the head rounded, shared by its query blocks (or null)

  PrefillTask(const AttentionParams& p_, const Tl& t_, const RowRange& rr_,
              PrefillScratch<T>& sc_, FiniteBlocks& finite_v_, RoundedHead<T>* head_ = nullptr)
      : p(p_), t(t_), rr(rr_), sc(sc_), finite_v(finite_v_), mask(p_, rr_.b), dr(p_),
        head(head_) {
    qcols = Tl::round_up(rr.rows, W);
    k_head = static_cast<const KV*>(p.k) + rr.b * p.k_stride.b + rr.hk * p.k_stride.h;
    v_head = static_cast<const KV*>(p.v) + rr.b * p.v_stride.b + rr.hk * p.v_stride.h;
  }

  // Returns whether sc.colmax holds the block's per-query maxima (only
  // when no mask changed the scores after they were computed).
  bool scores(int64_t j0, int64_t cols, bool inside) {
    if constexpr (kPairs) {
      const bool masked = mask.hides_any(inside);
      block_scores<T, PairSteps>(t, k_head + j0 * p.k_stride.r, p.k_stride.r, cols, qcols,
                                 !masked, sc.qt2, sc.ktail2, static_cast<T>(p.scale), sc);
      if (masked)
        mask.template apply<ScoreLayout::keys_major>(
            sc.st, BR, ScoreTile{rr.h, rr.i0, rr.rows, qcols, j0, cols}, sc.visible, inside);
      return !masked;
    } else {
      const T* k = sc.kbuf;
      int64_t ldk = t.d;
      if (t.k_direct) {
        k = reinterpret_cast<const T*>(k_head + j0 * p.k_stride.r);  // KV is T here
        ldk = p.k_stride.r;
      } else if (head) {
        head->ensure(p, t, k_head, v_head, j0);
        k = head->k + j0 * t.d;
      } else {
        copy_rows<T, KV>(k_head + j0 * p.k_stride.r, p.k_stride.r, p.k_stride.c, cols, cols, t.d,
                         t.d, sc.kbuf, t.round_bf16);
      }
      const bool masked = mask.hides_any(inside);
      block_scores<T>(t, k, ldk, cols, qcols, !masked, sc.qt, sc.ktail, T(1), sc);
      if (masked)
        mask.template apply<ScoreLayout::keys_major>(
            sc.st, BR, ScoreTile{rr.h, rr.i0, rr.rows, qcols, j0, cols}, sc.visible, inside);
      return !masked;
    }
  }

  void reset_chunk() {
    std::fill(sc.m, sc.m + BR, -std::numeric_limits<T>::infinity());
    std::fill(sc.l, sc.l + BR, T(0));
    for (int64_t e = 0; e < t.dvp; ++e) std::fill(sc.ot + e * BR, sc.ot + e * BR + qcols, T(0));
  }

  // Folds the finished chunk's state (m, l, ot) into the running one. The
  // first chunk is moved, not merged: merging into the empty state gives the
  // same bits (0 * 0 + x * 2^0), and it is the common case.
  void finish_chunk(bool first) {
    if (first) {
      std::swap(sc.m, sc.m_run);
      std::swap(sc.l, sc.l_run);
      std::swap(sc.ot, sc.ot_run);
      return;
    }
    for (int64_t i = 0; i < qcols; i += W)
      merge_states<T>(sc.m_run + i, sc.l_run + i, sc.m + i, sc.l + i, sc.alpha + i,
                      sc.scale_c + i);
    for (int64_t e = 0; e < t.dvp; ++e)
      for (int64_t i = 0; i < qcols; i += W) {
        T* o = sc.ot_run + e * BR + i;
        S::store(o, S::fmadd(S::load(o), S::load(sc.alpha + i),
                             S::mul(S::load(sc.ot + e * BR + i), S::load(sc.scale_c + i))));
      }
  }

  // One block of keys: scores, softmax update, O^T = O^T * alpha + V^T P^T
  // (block_values applies alpha).
  void block(int64_t j0, int64_t cols, bool inside) {
    const bool have_max = scores(j0, cols, inside);
    // bf16 products: the probabilities go straight to pairs or to rounded
    // values, unless dropout needs them unrounded in st first.
    const ProbOut out = !(t.pairs || t.round_bf16) ? ProbOut::exact
                        : dr.active()              ? ProbOut::bf16_unrounded
                        : t.pairs                  ? ProbOut::bf16_pairs
                                                   : ProbOut::bf16_values;
    block_softmax<T>(sc.st, BR, cols, j0 % t.bc, qcols, sc.m, sc.l, sc.alpha,
                     have_max ? sc.colmax : nullptr, out, sc.pt2);
    if (dr.active()) dropout_block<T>(dr, rr, j0, cols, sc.st);
    if (out == ProbOut::bf16_unrounded && t.round_bf16) round_probabilities<T>(sc.st, cols, qcols);
    if constexpr (kPairs) {
      if (out != ProbOut::bf16_pairs) probabilities_to_pairs<T>(sc.st, cols, qcols, sc.pt2);
      block_values<T, PairSteps>(t, v_head + (j0 / 2) * p.v_stride.r, p.v_stride.r,
                                 (cols + 1) / 2, (j0 % t.bc) / 2, qcols,
                                 finite_v.recorded_finite(rr.b, rr.hk, j0), sc.pt2, sc);
    } else if (t.v_direct) {
      const T* v = reinterpret_cast<const T*>(v_head + j0 * p.v_stride.r);  // KV is T here
      const bool finite = finite_v.finite<T>(rr.b, rr.hk, j0, reinterpret_cast<const T*>(v_head),
                                             p.v_stride.r, p.Lk, t.dv);
      block_values<T>(t, v, p.v_stride.r, cols, j0 % t.bc, qcols, finite, sc.st, sc);
    } else if (head) {
      block_values<T>(t, head->v + j0 * t.dvp, t.dvp, cols, j0 % t.bc, qcols,
                      head->finite(j0, t.bc), sc.st, sc);
    } else {
      // V widened (and rounded, for bf16 products) into rows of dvp and
      // read as in place. Packing MR-wide panels instead scattered each
      // row: at (8, 12, 128, 128, 64) on the widened bf16 path it was 9%
      // of the time, the row copy ~3% (perf record, 1 thread).
      copy_rows<T, KV>(v_head + j0 * p.v_stride.r, p.v_stride.r, p.v_stride.c, cols, cols, t.dv,
                       t.dvp, sc.vp, t.round_bf16);
      block_values<T>(t, sc.vp, t.dvp, cols, j0 % t.bc, qcols,
                      all_finite<T>(sc.vp, cols * t.dvp), sc.st, sc);
    }
  }

  void run() {
    if constexpr (kPairs)
      pack_query_pairs<T>(p, rr, qcols, (t.d + 1) / 2, sc.rows2, sc.qt2);
    else
      pack_query_transposed<T>(p, t, rr, qcols, static_cast<T>(p.scale), sc.qt);
    const int64_t chunk_keys = t.bc * kChunkBlocks;
    int64_t chunk = -1;
    bool first_chunk = true;
    mask.for_each_key_block(t.bc, rr.i0, rr.i0 + rr.rows - 1, sc.visible,
                            [&](int64_t j0, int64_t cols, bool inside) {
      cancellation_point();
      if (j0 / chunk_keys != chunk) {
        if (chunk >= 0) {
          finish_chunk(first_chunk);
          first_chunk = false;
        }
        chunk = j0 / chunk_keys;
        reset_chunk();
      }
      block(j0, cols, inside);
    });
    if (chunk < 0) reset_chunk();  // no visible key at all
    finish_chunk(first_chunk);
    write_output();
    if (p.weights) write_weights();
  }

  // out = O / l (one rounding: divide rather than multiply by 1/l); the
  // LSE = m + ln l, in double (see attention_params.h).
  // Rows that saw no key give zeros. Vectorised because at short keys
  // (L = 128) a scalar division and transposed store per output element
  // cost ~15% of the call: W x W tiles of O^T are divided W queries wide,
  // then transposed into the output rows. Tile by tile, so the divisions
  // of one tile (bound by the divider's throughput) overlap the stores of
  // the one before; a pass of all the divisions first, then all the
  // stores, was 10% of the call at L = 128.
  void write_output() {
    T* out = static_cast<T*>(p.out) + rr.b * p.out_stride.b + rr.h * p.out_stride.h +
             rr.i0 * p.out_stride.r;
    alignas(64) T tile[W * W];
    for (int64_t i = 0; i < rr.rows; i += W) {
      const int64_t n = std::min<int64_t>(W, rr.rows - i);
      const typename S::reg l = S::load(sc.l_run + i);
      const auto divide = [&](int64_t e) {
        T* o = sc.ot_run + e * BR + i;
        S::store(o, S::keep_where_zero(l, S::zero(), S::div(S::load(o), l)));
      };
      int64_t e = 0;
      for (; e + W <= t.dv; e += W) {
        for (int c = 0; c < W; ++c) divide(e + c);
        S::transpose_tile(sc.ot_run + e * BR + i, BR, tile);  // tile[c] = query i + c
        for (int64_t c = 0; c < n; ++c) {
          T* dst = out + (i + c) * p.out_stride.r + e * p.out_stride.c;
          if (p.out_stride.c == 1)
            std::memcpy(dst, tile + c * W, sizeof(T) * W);
          else
            for (int x = 0; x < W; ++x) dst[x * p.out_stride.c] = tile[c * W + x];
        }
      }
      for (; e < t.dv; ++e) {
        divide(e);
        for (int64_t c = 0; c < n; ++c)
          out[(i + c) * p.out_stride.r + e * p.out_stride.c] = sc.ot_run[e * BR + i + c];
      }
    }
    if (!p.lse) return;
    double* lse = p.lse + rr.b * p.lse_stride.b + rr.h * p.lse_stride.h;
    for (int64_t i = 0; i < rr.rows; ++i)
      lse[(rr.i0 + i) * p.lse_stride.r] = natural_lse(sc.m_run[i], sc.l_run[i]);
  }

  // Second pass, only when the weights are asked for: recompute each
  // block's scores and write e^(s - m) / l (after dropout). Not e^(s - lse):
  // with large logits lse is large and s - lse would cancel digits.
  void write_weights() {
    T* w = static_cast<T*>(p.weights) + rr.b * p.weights_stride.b + rr.h * p.weights_stride.h;
    mask.for_each_key_block(t.bc, rr.i0, rr.i0 + rr.rows - 1, sc.visible,
                            [&](int64_t j0, int64_t cols, bool inside) {
      scores(j0, cols, inside);
      for (int64_t i = 0; i < rr.rows; ++i) {
        const T m = sc.m_run[i], l = sc.l_run[i];
        for (int64_t jj = 0; jj < cols; ++jj) {
          T& s = sc.st[jj * BR + i];
          s = l != T(0) ? std::exp(s - m) / l : T(0);
        }
      }
      if (dr.active()) dropout_block<T>(dr, rr, j0, cols, sc.st);
      for (int64_t i = 0; i < rr.rows; ++i) {
        T* row = w + (rr.i0 + i) * p.weights_stride.r + j0 * p.weights_stride.c;
        for (int64_t jj = 0; jj < cols; ++jj) row[jj * p.weights_stride.c] = sc.st[jj * BR + i];
      }
    });
  }
};

// Tasks are handed out head by head, and within a head from the last query
// block to the first. Head by head: a thread's next task then reads the
// K and V it just read, from its L2, rather than another head's from L3
// (with heads interleaved, only reading V for the finite check cost ~4% of
// the time at L = 1024). Last block first: with a causal mask the last
// blocks see the most keys, so the pool ends on the small first blocks of
// the last head, and no core idles long at the end.
//
// items: n calls that share the dtype, D, Dv and the strides (so one
// tiling serves them all) and run as one job on the pool, item after item
// in the task order; the sequences of a variable-length batch
// (attention_forward_items). Each task computes exactly what it would in a
// call of its item alone.
// head_tasks: one task per head, its query blocks in the same order, K and
// V rounded once into a RoundedHead (the widened bf16 method, t.round_bf16).
template <typename T, typename KV>
void run_prefill_tasks(const AttentionParams* items, int64_t n, const PrefillTiling<T>& t,
                       std::vector<FiniteBlocks>& finite_v, bool head_tasks = false) {
  using Tl = PrefillTiling<T>;
  const auto blocks_of = [](const AttentionParams& p) { return (p.Lq + Tl::BR - 1) / Tl::BR; };
  std::vector<int64_t> first_task(static_cast<size_t>(n) + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const AttentionParams& p = items[i];
    first_task[i + 1] = first_task[i] + (head_tasks ? 1 : blocks_of(p)) * p.B * p.Hq;
  }
  parallel_for(first_task[n], [&](int64_t task, int) {
    static thread_local Arena arena, head_arena;
    PrefillScratch<T> sc(arena, t);
    const int64_t item =
        std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
    const AttentionParams& p = items[item];
    const int64_t local = task - first_task[item];
    const int64_t blocks = blocks_of(p);
    const auto run_block = [&](int64_t bh, int64_t qb, RoundedHead<T>* head) {
      RowRange rr;
      rr.b = bh / p.Hq;
      rr.h = bh % p.Hq;
      rr.hk = rr.h / p.group_size();
      rr.i0 = qb * Tl::BR;
      rr.rows = std::min<int64_t>(Tl::BR, p.Lq - rr.i0);
      PrefillTask<T, KV>(p, t, rr, sc, finite_v[item], head).run();
    };
    if (head_tasks) {
      RoundedHead<T> head(head_arena, p, t);
      for (int64_t qb = blocks - 1; qb >= 0; --qb) run_block(local, qb, &head);
    } else {
      run_block(local / blocks, blocks - 1 - local % blocks, nullptr);
    }
  });
}

// The finite-V flags of each item.
inline std::vector<FiniteBlocks> finite_flags(const AttentionParams* items, int64_t n,
                                              int64_t bc) {
  std::vector<FiniteBlocks> finite_v;
  finite_v.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) finite_v.emplace_back(items[i], bc);
  return finite_v;
}

template <typename T, typename KV>
void prefill_forward_items(const AttentionParams* items, int64_t n) {
  const PrefillTiling<T> t(items[0]);
  std::vector<FiniteBlocks> finite_v = finite_flags(items, n, t.bc);
  run_prefill_tasks<T, KV>(items, n, t, finite_v);
}

template <typename T, typename KV>
void prefill_forward(const AttentionParams& p) {
  prefill_forward_items<T, KV>(&p, 1);
}

// bf16 products (float32 q and out; K and V float32 or binary16, KV): K
// and V rounded into pairs once, then the tasks as above on them. Calls
// with a decode step's few queries take the decode path instead (its
// kRound), which needs no conversion pass over the keys.
constexpr size_t kRoundedHeadBytes = size_t(8) << 20;  // per thread
template <typename KV>
void prefill_forward_items_bf16(const AttentionParams* items, int64_t n) {
  const PrefillTiling<float> t(items[0]);
  std::vector<FiniteBlocks> finite_v = finite_flags(items, n, t.bc);
  if constexpr (Simd<float>::kBf16Dot) {  // t.pairs
    const Bf16Operands ops(items, n, t.dvp, t.bc, finite_v, static_cast<const KV*>(nullptr));
    run_prefill_tasks<float, Bf16Pair>(ops.params.data(), n, t, finite_v);
  } else {
    // The float32 kernel on operands rounded to bf16 values, K and V
    // rounded, by the number of query blocks that read each key block:
    //   more than two: once per call (RoundedOperands);
    //   two: once per head, by a task that runs both (RoundedHead), when
    //        a head's copy takes at most kRoundedHeadBytes;
    //   one: as each block is copied.
    // Measured (Zen 5, avx512 path, bench_bf16_attention.py, bf16 time /
    // float32 time): at (1, 16, 1024, 1024, 64) per block 1.45x, once per
    // call 1.07x; at (8, 12, 128, 128, 64) once per call 1.33x, per block
    // 1.25x, per head 1.0x. All give the same values to the same kernel,
    // so the same bits.
    bool many = false, two = false, small = true;
    for (int64_t i = 0; i < n; ++i) {
      many = many || items[i].Lq > 2 * PrefillTiling<float>::BR;
      two = two || items[i].Lq > PrefillTiling<float>::BR;
      small = small && RoundedHead<float>::bytes(items[i], t) <= kRoundedHeadBytes;
    }
    if (!many) {
      run_prefill_tasks<float, KV>(items, n, t, finite_v, two && small);
    } else {
      const RoundedOperands ops(items, n, t.bc, static_cast<const KV*>(nullptr));
      const PrefillTiling<float> rounded(ops.params[0], /*kv_rounded=*/true);
      run_prefill_tasks<float, float>(ops.params.data(), n, rounded, finite_v);
    }
  }
}
