// The fused attention backward, flash-attention style. A fragment included
// inside tileattn::<isa> after kernel_common.h and kernel_gemm.h.
//
// With P = softmax(scale * Q K^T + mask) (per row, from the forward's lse),
// Pd = dropout(P), O = Pd V and the incoming dO:
//   Di = rowsum(dO_i * O_i)
//   dV = Pd^T dO            dPd = dO V^T          dP = dropout'(dPd)
//   dS = P * (dP - D)       dQ = scale dS K       dK = scale dS^T Q
// P is recomputed tile by tile (BR queries x BC keys) from Q, K and lse;
// the Lq x Lk matrix never exists. Key blocks a causal mask, a window or
// the padding hides are skipped exactly as in the forward.
//
// Work split and determinism (no floating-point atomics anywhere):
// dK/dV of a key block sum over every query (and every query head of the
// GQA group); dQ of a query block sums over every key. A task is one
// (batch, KV head, key segment): it owns the dK/dV of its keys and sums
// them over the group's heads and the query blocks in a fixed order. Its
// contribution to dQ goes to a buffer of its own (one per segment), and a
// second pass adds the segments' buffers in segment order. So every sum
// has an order fixed by the shapes, never by the scheduling, and each
// product S, dP is computed once (a separate dQ pass would recompute both:
// 7 tile products instead of 5). Segments are at most kBackwardMaxSegments per
// head, and the buffers exist for a chunk of heads at a time (at most
// kBackwardPartsBudget bytes): O(L) memory per head, bounded in all.
// The segmentation depends only on Lk, not on the thread count or B.
//
// Accuracy: S keeps the forward's bits (the same rounded q * scale, the
// same multiply-add chain), and lse comes in float64 and is split into
// hi + lo, so P = e^(s - lse) matches the forward's weights to its lse's
// rounding (a row that sees one key gets exactly 1); D_i is summed in
// extended precision; long sums (dP over the value size, dK/dV over query
// blocks, dQ over key blocks) are blocked.

constexpr int64_t kBackwardMaxSegments = 4;
constexpr int64_t kBackwardMinSegmentKeys = 256;
// Key blocks are taken kBackwardPanel at a time, and each query block is
// packed once per panel and run against its blocks; the sums keep the
// order of one block at a time (see BackwardTask::run).
constexpr int64_t kBackwardPanel = 4;
// dP sums over the value size in blocks of kSumBlock terms, each block a
// multiply-add chain added to the running sum (fewer roundings per term
// than one chain over the whole head).
constexpr int64_t kSumBlock = 16;

template <typename T>
struct BackwardTiling {
  using S = Simd<T>;
  static constexpr int W = S::W, MR = S::MR;
  static constexpr int64_t BR = 64;  // query rows per tile
  static constexpr int64_t BC = 64;  // keys per tile (a multiple of every W and MR)
  static_assert(BC % W == 0 && BC % MR == 0 && BR % MR == 0, "tiles must hold whole registers");

  int64_t d, dv, dp, dvp;  // head sizes, and rounded up to W
  int64_t seg_keys, nseg;  // keys per segment, segments per head
  int64_t lq_pad;          // Lq rounded up to BR (rows of a dQ buffer)

  explicit BackwardTiling(const AttentionParams& p) : d(p.D), dv(p.Dv) {
    dp = round_up(std::max<int64_t>(d, 1), W);
    dvp = round_up(std::max<int64_t>(dv, 1), W);
    const int64_t want = std::clamp<int64_t>((p.Lk + kBackwardMinSegmentKeys - 1) /
                                                 kBackwardMinSegmentKeys,
                                             1, kBackwardMaxSegments);
    seg_keys = round_up(std::max<int64_t>((p.Lk + want - 1) / want, 1), BC);
    nseg = std::max<int64_t>((p.Lk + seg_keys - 1) / seg_keys, 1);
    lq_pad = round_up(p.Lq, BR);
  }
  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
};

// Query rows of one segment's keys [k_lo, k_hi) that see any of them, as
// whole query blocks [qb_lo, qb_hi); empty when qb_lo >= qb_hi. The task
// that computes a segment and the pass that adds the segments' dQ buffers
// both use this, so they agree on which rows a buffer holds.
struct SegmentRows {
  int64_t k_lo, k_hi, qb_lo, qb_hi;
};

template <typename T>
SegmentRows segment_rows(const AttentionParams& p, const BackwardTiling<T>& t,
                         const KeyBounds& kb, int64_t seg) {
  using Tl = BackwardTiling<T>;
  SegmentRows r;
  r.k_lo = seg * t.seg_keys;
  r.k_hi = std::min(r.k_lo + t.seg_keys, kb.lk);
  r.qb_lo = r.qb_hi = 0;
  if (r.k_lo >= r.k_hi || p.Lq == 0) return r;
  const int64_t qa = std::max<int64_t>(kb.first_query(r.k_lo), 0);
  const int64_t qz = std::min<int64_t>(kb.last_query(r.k_hi - 1), p.Lq - 1);
  if (qa > qz) return r;
  r.qb_lo = qa / Tl::BR;
  r.qb_hi = qz / Tl::BR + 1;
  return r;
}

// One key block of a panel: its packed keys and values, its dK/dV sums,
// which of its keys the padding keeps and which query blocks see it.
template <typename T>
struct KeyBlock {
  T *kt, *vt, *kbuf, *dk, *dv;  // K^T, V^T, K, and the dK, dV sums
  uint8_t* visible;
  int64_t j0, cols;             // keys [j0, j0 + cols) that are read
  int64_t qb_lo, qb_hi;         // query blocks that see some of them
  bool active, finite;          // any query sees it; K holds no NaN or inf
};

template <typename T>
struct BackwardScratch {
  KeyBlock<T> blocks[kBackwardPanel];
  T *q, *qf, *dout, *dsum;      // one query block (qf: q * scale)
  T *lse_hi, *lse_lo;           // its lse as an unevaluated sum hi + lo
  T *s, *pd, *dp;               // one tile: P, dropped P, dP then dS

  BackwardScratch(Arena& a, const BackwardTiling<T>& t) {
    using Tl = BackwardTiling<T>;
    constexpr size_t BR = Tl::BR, BC = Tl::BC;
    const size_t n = kBackwardPanel * BC * (t.d + t.dv + 2 * t.dp + t.dvp) +
                     BR * (2 * t.dp + t.dvp + 3) + 3 * BR * BC;
    a.reset(sizeof(T) * n + kBackwardPanel * (BC + 6 * 64));
    for (KeyBlock<T>& kbk : blocks) {
      kbk.kt = a.carve<T>(BC * t.d);
      kbk.vt = a.carve<T>(BC * t.dv);
      kbk.kbuf = a.carve<T>(BC * t.dp);
      kbk.dk = a.carve<T>(BC * t.dp);
      kbk.dv = a.carve<T>(BC * t.dvp);
      kbk.visible = a.carve<uint8_t>(BC);
    }
    q = a.carve<T>(BR * t.dp);
    qf = a.carve<T>(BR * t.dp);
    dout = a.carve<T>(BR * t.dvp);
    dsum = a.carve<T>(BR);
    lse_hi = a.carve<T>(BR);
    lse_lo = a.carve<T>(BR);
    s = a.carve<T>(BR * BC);
    pd = a.carve<T>(BR * BC);
    dp = a.carve<T>(BR * BC);
  }
};

// dst[r][c] (row stride ld) = src[r][c] for r < n, c < cols; zero for
// columns [cols, ld) and rows [n, n_pad). The padding makes the tile
// products' extra lanes and rows exact zeros.
template <typename T>
void pack_rows(const T* src, int64_t sr, int64_t sc, int64_t n, int64_t n_pad, int64_t cols,
               int64_t ld, T* dst) {
  for (int64_t r = 0; r < n_pad; ++r) {
    T* row = dst + r * ld;
    int64_t c = 0;
    if (r < n && sc == 1) {  // the common layout: one copy per row
      std::memcpy(row, src + r * sr, sizeof(T) * cols);
      c = cols;
    } else if (r < n) {
      for (; c < cols; ++c) row[c] = src[r * sr + c * sc];
    }
    for (; c < ld; ++c) row[c] = T(0);
  }
}

// dst[c][r] (row stride ld) = src[r][c] for r < n, c < cols; zero for
// r in [n, ld).
template <typename T>
void pack_transposed(const T* src, int64_t sr, int64_t sc, int64_t n, int64_t cols, int64_t ld,
                     T* dst) {
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ld + n, dst + (c + 1) * ld, T(0));
  for (int64_t r = 0; r < n; ++r) {
    const T* row = src + r * sr;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = row[c * sc];
  }
}

template <typename T>
struct BackwardTask {
  using Tl = BackwardTiling<T>;
  using S = Simd<T>;
  using reg = typename S::reg;
  static constexpr int64_t BR = Tl::BR, BC = Tl::BC;
  static constexpr int W = Tl::W, MR = Tl::MR;

  const BackwardParams& bp;
  const AttentionParams& p;
  const Tl& t;
  BackwardScratch<T>& sc;
  const T* dsum_all;  // (B, Hq, Lq) row sums dO . O
  T* dq_part;         // this task's dQ buffer: (group, lq_pad, dp), its query heads
  ScoreMask<T> mask;
  const KeyBounds& kb;  // mask.bounds()
  Dropout dr;
  int64_t b, hk, seg;
  T factor;  // scale, rounded to T as the forward rounds it

  BackwardTask(const BackwardParams& bp_, const Tl& t_, BackwardScratch<T>& sc_, const T* dsum_,
               T* part, int64_t b_, int64_t hk_, int64_t seg_)
      : bp(bp_), p(bp_.fwd), t(t_), sc(sc_), dsum_all(dsum_), dq_part(part), mask(bp_.fwd, b_),
        kb(mask.bounds()), dr(bp_.fwd), b(b_), hk(hk_), seg(seg_) {
    factor = static_cast<T>(p.scale);
  }

  T* part_rows(int64_t h, int64_t i0) const {
    return dq_part + ((h - hk * p.group_size()) * t.lq_pad + i0) * t.dp;
  }

  // Key blocks go in panels of kBackwardPanel: each panel's blocks are
  // packed, then every query block of every head of the group is packed
  // once and run against the panel's blocks that it sees. The sums keep
  // the order of one key block at a time: a block's dK/dV over (head,
  // query block) in increasing order, a query block's dQ over key blocks
  // in increasing order.
  void run() {
    const SegmentRows sr = segment_rows<T>(p, t, kb, seg);
    const int64_t group = p.group_size();
    // Zero the dQ rows this segment may touch (and the adding pass reads).
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      std::fill(part_rows(h, sr.qb_lo * BR), part_rows(h, sr.qb_hi * BR), T(0));
    }
    const int64_t own_hi = std::min(seg * t.seg_keys + t.seg_keys, p.Lk);
    for (int64_t p0 = seg * t.seg_keys; p0 < own_hi; p0 += BC * kBackwardPanel) {
      cancellation_point();
      int64_t n_blocks = 0, qb_lo = std::numeric_limits<int64_t>::max(), qb_hi = 0;
      for (int64_t j0 = p0; j0 < std::min(own_hi, p0 + BC * kBackwardPanel); j0 += BC) {
        KeyBlock<T>& kbk = sc.blocks[n_blocks++];
        kbk.j0 = j0;
        // Keys past this item's key_lengths are in the array but not read.
        kbk.cols = std::clamp<int64_t>(sr.k_hi - j0, 0, std::min(BC, own_hi - j0));
        prepare_block(sr, kbk);
        if (kbk.active) {
          qb_lo = std::min(qb_lo, kbk.qb_lo);
          qb_hi = std::max(qb_hi, kbk.qb_hi);
        }
      }
      for (int64_t g = 0; g < group; ++g)
        for (int64_t qb = qb_lo; qb < qb_hi; ++qb) {
          const int64_t i0 = qb * BR, rows = std::min(BR, p.Lq - i0);
          bool packed = false;
          for (int64_t n = 0; n < n_blocks; ++n) {
            const KeyBlock<T>& kbk = sc.blocks[n];
            if (!kbk.active || qb < kbk.qb_lo || qb >= kbk.qb_hi) continue;
            if (!packed) pack_query_block(hk * group + g, i0, rows);
            packed = true;
            tile(kbk, hk * group + g, i0, rows);
          }
        }
      for (int64_t n = 0; n < n_blocks; ++n) {
        const KeyBlock<T>& kbk = sc.blocks[n];
        const int64_t all = std::min(BC, own_hi - kbk.j0);
        if (kbk.active) write_key_grads(kbk, kbk.j0, kbk.cols, true);
        const int64_t done = kbk.active ? kbk.cols : 0;
        if (done < all) write_key_grads(kbk, kbk.j0 + done, all - done, false);
      }
    }
  }

  // Packs one block of keys [j0, j0 + cols) (cols may be 0: past
  // key_lengths) and zeroes its sums; inactive when no query sees any of
  // them (their gradients are 0).
  void prepare_block(const SegmentRows& sr, KeyBlock<T>& kbk) {
    const int64_t j0 = kbk.j0, cols = kbk.cols;
    kbk.active = false;
    if (cols <= 0 || sr.qb_lo >= sr.qb_hi) return;
    if (mask.mark_keys(j0, cols, kbk.visible) == 0) return;
    const int64_t qa = std::max<int64_t>(kb.first_query(j0), 0);
    const int64_t qz = std::min<int64_t>(kb.last_query(j0 + cols - 1), p.Lq - 1);
    if (qa > qz) return;
    kbk.active = true;
    kbk.qb_lo = qa / BR;
    kbk.qb_hi = qz / BR + 1;
    const T* k = static_cast<const T*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h +
                 j0 * p.k_stride.r;
    const T* v = static_cast<const T*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h +
                 j0 * p.v_stride.r;
    pack_transposed<T>(k, p.k_stride.r, p.k_stride.c, cols, t.d, BC, kbk.kt);
    pack_transposed<T>(v, p.v_stride.r, p.v_stride.c, cols, t.dv, BC, kbk.vt);
    pack_rows<T>(k, p.k_stride.r, p.k_stride.c, cols, BC, t.d, t.dp, kbk.kbuf);
    kbk.finite = all_finite<T>(kbk.kbuf, BC * t.dp);
    std::fill(kbk.dk, kbk.dk + BC * t.dp, T(0));
    std::fill(kbk.dv, kbk.dv + BC * t.dvp, T(0));
  }

  // dK = scale * (sum of dS^T Q), dV = sum of Pd^T dO for keys [j0, j0 + cols)
  // of the block, or zeros.
  void write_key_grads(const KeyBlock<T>& kbk, int64_t j0, int64_t cols, bool computed) {
    const T scale = static_cast<T>(p.scale);
    T* dk = static_cast<T*>(bp.dk) + b * bp.dk_stride.b + hk * bp.dk_stride.h;
    T* dv = static_cast<T*>(bp.dv) + b * bp.dv_stride.b + hk * bp.dv_stride.h;
    const int64_t sk = bp.dk_stride.c, sv = bp.dv_stride.c;
    for (int64_t jj = 0; jj < cols; ++jj) {
      T* rk = dk + (j0 + jj) * bp.dk_stride.r;
      T* rv = dv + (j0 + jj) * bp.dv_stride.r;
      if (!computed) {
        for (int64_t x = 0; x < t.d; ++x) rk[x * sk] = T(0);
        for (int64_t e = 0; e < t.dv; ++e) rv[e * sv] = T(0);
        continue;
      }
      const T* ak = kbk.dk + (j0 - kbk.j0 + jj) * t.dp;
      const T* av = kbk.dv + (j0 - kbk.j0 + jj) * t.dvp;
      if (sk == 1)  // unit stride: a loop the compiler vectorises
        for (int64_t x = 0; x < t.d; ++x) rk[x] = ak[x] * scale;
      else
        for (int64_t x = 0; x < t.d; ++x) rk[x * sk] = ak[x] * scale;
      if (sv == 1)
        std::memcpy(rv, av, sizeof(T) * t.dv);
      else
        for (int64_t e = 0; e < t.dv; ++e) rv[e * sv] = av[e];
    }
  }

  void pack_query_block(int64_t h, int64_t i0, int64_t rows) {
    const int64_t m = Tl::round_up(rows, MR);
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + h * p.q_stride.h +
                 i0 * p.q_stride.r;
    const T* dout = static_cast<const T*>(bp.dout) + b * bp.dout_stride.b +
                    h * bp.dout_stride.h + i0 * bp.dout_stride.r;
    pack_rows<T>(q, p.q_stride.r, p.q_stride.c, rows, m, t.d, t.dp, sc.q);
    // The scores' query operand rounded exactly as the forward packs it, so
    // that S (a fused multiply-add chain in the same order) has its bits.
    const reg f = S::set1(factor);
    for (int64_t i = 0; i < m * t.dp; i += W) S::store(sc.qf + i, S::mul(S::load(sc.q + i), f));
    pack_rows<T>(dout, bp.dout_stride.r, bp.dout_stride.c, rows, m, t.dv, t.dvp, sc.dout);
    const double* lse = p.lse + b * p.lse_stride.b + h * p.lse_stride.h;
    const T* dsum = dsum_all + (b * p.Hq + h) * p.Lq;
    for (int64_t i = 0; i < BR; ++i) {
      const double l = i < rows ? lse[(i0 + i) * p.lse_stride.r]
                                : -std::numeric_limits<double>::infinity();
      // s - lse = (s - hi) - lo: the first difference is exact for the
      // scores near the row's maximum (the weights that matter), so the
      // weights keep the digits of lse's float64 even when T is float.
      sc.lse_hi[i] = static_cast<T>(l);
      sc.lse_lo[i] = std::isfinite(l) ? static_cast<T>(l - static_cast<double>(sc.lse_hi[i])) : T(0);
      sc.dsum[i] = i < rows ? dsum[i0 + i] : T(0);
    }
  }

  // s (m x n tile of scores) -> P = e^(s (+ mask) - lse). Rows
  // with lse = -inf (no visible key, or padding rows) and columns past cols
  // get exact zeros.
  void probabilities(const uint8_t* visible, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                     int64_t cols, int64_t m, bool inside) {
    const int64_t n = Tl::round_up(cols, std::max(W, MR));
    if (mask.hides_any(inside))
      mask.template apply<ScoreLayout::rows_major>(sc.s, BC, ScoreTile{h, i0, rows, rows, j0, cols},
                                                   visible, inside);
    for (int64_t i = 0; i < m; ++i) {
      T* row = sc.s + i * BC;
      if (sc.lse_hi[i] == -std::numeric_limits<T>::infinity()) {
        std::fill(row, row + BC, T(0));
        continue;
      }
      const reg hi = S::set1(sc.lse_hi[i]), lo = S::set1(sc.lse_lo[i]);
      for (int64_t jj = 0; jj < n; jj += W)
        S::store(row + jj, vec_exp_diff<S>(S::sub(S::load(row + jj), hi), lo));
      std::fill(row + cols, row + BC, T(0));
    }
  }

  // Pd = P with the forward's dropout mask applied (kept weights / (1 - p)).
  void apply_dropout(int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols, int64_t m) {
    const T keep = static_cast<T>(dr.keep_scale());
    for (int64_t i = 0; i < m; ++i) {
      const T* ps = sc.s + i * BC;
      T* pd = sc.pd + i * BC;
      if (i >= rows) {
        std::fill(pd, pd + BC, T(0));
        continue;
      }
      const uint64_t key = dr.row_key(b, h, i0 + i);
      for (int64_t jj = 0; jj < cols; ++jj) pd[jj] = dr.drop(key, j0 + jj) ? T(0) : ps[jj] * keep;
      std::fill(pd + cols, pd + BC, T(0));
    }
  }

  // dP (in sc.dp) -> dS = P * (dP' - Di), where dP' is dP through the
  // dropout (x keep scale where kept, 0 where dropped). Where P = 0 the
  // result is an exact 0 (a NaN or inf in dP of a hidden key stays out).
  void score_grads(int64_t m, int64_t n) {
    const reg zero = S::zero();
    const reg keep = S::set1(static_cast<T>(dr.keep_scale()));
    for (int64_t i = 0; i < m; ++i) {
      const reg di = S::set1(sc.dsum[i]);
      for (int64_t jj = 0; jj < n; jj += W) {
        const int64_t o = i * BC + jj;
        const reg pv = S::load(sc.s + o);
        reg g = S::load(sc.dp + o);
        if (dr.active()) g = S::keep_where_zero(S::load(sc.pd + o), zero, S::mul(g, keep));
        S::store(sc.dp + o, S::keep_where_zero(pv, zero, S::mul(pv, S::sub(g, di))));
      }
    }
  }

  // One tile: query rows [i0, i0 + rows) of head h (packed) against a key block.
  void tile(const KeyBlock<T>& kbk, int64_t h, int64_t i0, int64_t rows) {
    const int64_t j0 = kbk.j0, cols = kbk.cols;
    const bool inside = mask.inside_bounds(i0, i0 + rows - 1, j0, cols);
    const int64_t m = Tl::round_up(rows, MR);  // query rows, padded
    // Keys as lanes (n) and as rows of the transposed products (mk <= n):
    // every lane or row past cols holds an exact 0.
    const int64_t n = Tl::round_up(cols, std::max(W, MR));
    const int64_t mk = Tl::round_up(cols, MR);
    // S = scale Q K^T (queries x keys), then P. Segments of kScoreSegment
    // of the head, each its own chain and added in order, as the forward
    // forms its scores: S has the forward's bits, so a row that sees one
    // key gets P = e^(s - lse) = 1 exactly.
    for (int64_t x0 = 0; x0 == 0 || x0 < t.d; x0 += kScoreSegment)
      gemm_tile<T>(m, n, std::min<int64_t>(kScoreSegment, t.d - x0), sc.qf + x0, t.dp, 1,
                   kbk.kt + x0 * BC, BC, sc.s, BC, x0 > 0);
    probabilities(kbk.visible, h, i0, rows, j0, cols, m, inside);
    const T* pd = sc.s;
    if (dr.active()) {
      apply_dropout(h, i0, rows, j0, cols, m);
      pd = sc.pd;
    }
    // dP = dO V^T; dV += Pd^T dO.
    for (int64_t e0 = 0; e0 < std::max<int64_t>(t.dv, 1); e0 += kSumBlock)
      gemm_tile<T>(m, n, std::min<int64_t>(kSumBlock, t.dv - e0), sc.dout + e0, t.dvp, 1,
                   kbk.vt + e0 * BC, BC, sc.dp, BC, e0 > 0);
    gemm_tile<T>(mk, t.dvp, rows, pd, 1, BC, sc.dout, t.dvp, kbk.dv, t.dvp, true);
    score_grads(m, n);
    if (bp.dscores) write_score_grads(h, i0, rows, j0, cols);
    // dK += dS^T Q; dQ += dS K (into this segment's buffer). A non-finite
    // key (e.g. garbage in a padding slot) must not reach the rows that
    // cannot see it through 0 * inf: skip zero terms then.
    gemm_tile<T>(mk, t.dp, rows, sc.dp, 1, BC, sc.q, t.dp, kbk.dk, t.dp, true);
    if (kbk.finite)
      gemm_tile<T>(m, t.dp, cols, sc.dp, BC, 1, kbk.kbuf, t.dp, part_rows(h, i0), t.dp, true);
    else
      gemm_tile<T, true>(m, t.dp, cols, sc.dp, BC, 1, kbk.kbuf, t.dp, part_rows(h, i0), t.dp,
                         true);
  }

  void write_score_grads(int64_t h, int64_t i0, int64_t rows, int64_t j0, int64_t cols) {
    T* ds = static_cast<T*>(bp.dscores) + b * bp.dscores_stride.b + h * bp.dscores_stride.h +
            j0 * bp.dscores_stride.c;
    for (int64_t i = 0; i < rows; ++i) {
      T* row = ds + (i0 + i) * bp.dscores_stride.r;
      for (int64_t jj = 0; jj < cols; ++jj) row[jj * bp.dscores_stride.c] = sc.dp[i * BC + jj];
    }
  }
};

// Di = sum_e dO[i][e] * O[i][e] for the rows of one (batch, head), summed
// in extended precision (double for float, long double for double) and
// rounded once: Di is subtracted from every dP_ij of its row, so its error
// would shift every dS_ij of the row alike.
template <typename T>
void row_dot_products(const BackwardParams& bp, int64_t b, int64_t h, T* dsum) {
  using Wide = typename std::conditional<std::is_same<T, float>::value, double,
                                         long double>::type;
  const AttentionParams& p = bp.fwd;
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h;
  const T* g = static_cast<const T*>(bp.dout) + b * bp.dout_stride.b + h * bp.dout_stride.h;
  for (int64_t i = 0; i < p.Lq; ++i) {
    const T* oi = o + i * p.out_stride.r;
    const T* gi = g + i * bp.dout_stride.r;
    Wide acc = 0;
    for (int64_t e = 0; e < p.Dv; ++e)
      acc += static_cast<Wide>(gi[e * bp.dout_stride.c]) * static_cast<Wide>(oi[e * p.out_stride.c]);
    dsum[i] = static_cast<T>(acc);
  }
}

// dQ rows of one query block of head h = scale * (the segments' buffers
// added in segment order); rows no segment touched are 0. slab(s) is
// segment s's buffer (group, lq_pad, dp) of h's key/value head.
template <typename T, typename Slab>
void reduce_query_grads(const BackwardParams& bp, const BackwardTiling<T>& t, Slab slab,
                        int64_t b, int64_t h, int64_t qb) {
  using Tl = BackwardTiling<T>;
  const AttentionParams& p = bp.fwd;
  const KeyBounds kb(p, b);
  const int64_t i0 = qb * Tl::BR, rows = std::min<int64_t>(Tl::BR, p.Lq - i0);
  const int64_t g = h % p.group_size();
  const T scale = static_cast<T>(p.scale);
  T* dq = static_cast<T*>(bp.dq) + b * bp.dq_stride.b + h * bp.dq_stride.h;
  // Segments whose rows include this block, in order.
  int64_t used[kBackwardMaxSegments];
  int64_t n_used = 0;
  for (int64_t s = 0; s < t.nseg; ++s) {
    const SegmentRows sr = segment_rows<T>(p, t, kb, s);
    if (sr.qb_lo <= qb && qb < sr.qb_hi) used[n_used++] = s;
  }
  // Row by row into a scratch row (vectorisable), then scaled out.
  T acc[1024];
  for (int64_t x0 = 0; x0 < t.d; x0 += 1024) {
    const int64_t nx = std::min<int64_t>(1024, t.d - x0);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = g * t.lq_pad + i0 + i;
      std::fill(acc, acc + nx, T(0));
      for (int64_t u = 0; u < n_used; ++u) {
        const T* src = slab(used[u]) + row * t.dp + x0;
        if (u == 0)
          std::memcpy(acc, src, sizeof(T) * nx);
        else
          for (int64_t x = 0; x < nx; ++x) acc[x] = acc[x] + src[x];
      }
      T* dst = dq + (i0 + i) * bp.dq_stride.r + x0 * bp.dq_stride.c;
      for (int64_t x = 0; x < nx; ++x) dst[x * bp.dq_stride.c] = acc[x] * scale;
    }
  }
}

// The dQ buffers of at most this many bytes exist at once: key/value heads
// are taken in chunks that fit (at least one), so a large batch does not
// need nseg copies of its whole dQ. Chunks change no arithmetic.
constexpr size_t kBackwardPartsBudget = size_t(64) << 20;

template <typename T>
void backward_typed(const BackwardParams& bp) {
  using Tl = BackwardTiling<T>;
  const AttentionParams& p = bp.fwd;
  const Tl t(p);
  const int64_t group = p.group_size();
  const int64_t heads = p.B * p.Hkv;  // (batch, key/value head) pairs
  // Scratch: the row dot products Di (B * Hq * Lq), and per segment and
  // (batch, key/value head) of the current chunk one dQ buffer of its query
  // heads (group, lq_pad, dp). O(L) in all.
  const size_t per_head = static_cast<size_t>(group) * t.lq_pad * t.dp;
  const int64_t chunk = std::clamp<int64_t>(
      static_cast<int64_t>(kBackwardPartsBudget / std::max<size_t>(sizeof(T) * t.nseg * per_head, 1)),
      1, std::max<int64_t>(heads, 1));
  const size_t n_dsum = Tl::round_up(std::max<int64_t>(p.B * p.Hq * p.Lq, 1), 16);
  const size_t bytes = sizeof(T) * (n_dsum + t.nseg * chunk * per_head);
  T* mem = static_cast<T*>(std::aligned_alloc(64, Tl::round_up(std::max<size_t>(bytes, 64), 64)));
  if (!mem) throw std::bad_alloc();
  struct Free { T* p; ~Free() { std::free(p); } } free_mem{mem};
  T* dsum = mem;
  T* parts = mem + n_dsum;
  auto slab = [&](int64_t seg, int64_t local) { return parts + (seg * chunk + local) * per_head; };

  parallel_for(p.B * p.Hq, [&](int64_t bh, int) {
    row_dot_products<T>(bp, bh / p.Hq, bh % p.Hq, dsum + bh * p.Lq);
  });
  const int64_t qblocks = t.lq_pad / Tl::BR;
  for (int64_t c0 = 0; c0 < heads; c0 += chunk) {
    const int64_t nc = std::min(chunk, heads - c0);
    // Segment-major task order: with a causal mask the first segments' keys
    // are seen by the most queries, so the longest tasks start first.
    if (p.Lk > 0) {
      parallel_for(t.nseg * nc, [&](int64_t task, int) {
        static thread_local Arena arena;
        BackwardScratch<T> sc(arena, t);
        const int64_t seg = task / nc, local = task % nc, bh = c0 + local;
        BackwardTask<T>(bp, t, sc, dsum, slab(seg, local), bh / p.Hkv, bh % p.Hkv, seg).run();
      });
    }
    parallel_for(nc * group * qblocks, [&](int64_t task, int) {
      const int64_t local = task / (group * qblocks), bh = c0 + local;
      const int64_t h = (bh % p.Hkv) * group + (task / qblocks) % group;
      reduce_query_grads<T>(bp, t, [&](int64_t s) { return slab(s, local); }, bh / p.Hkv, h,
                            task % qblocks);
    });
  }
}
