// The decode path: a few queries (Lq <= kDecodeMaxQueries) against many
// keys, as in token-by-token generation with a KV cache. A fragment
// included inside tileattn::<isa> after kernel_prefill.h.
//
// Here the prefill tiling would waste most SIMD lanes (they run across
// queries) and read K and V once per query head. Instead one task takes one
// (batch, KV head, chunk of keys) and all the query rows that share that KV
// head (group x Lq rows, the GQA group), so K and V are read once for the
// group; lanes run across keys for the scores and across value columns for
// the output. Chunks are the data-defined chunks of kernel_common.h, so the
// parallelism does not depend on the thread count, and B = 1 still keeps
// every core busy; their states are merged in chunk order afterwards.
//
// Every per-row operation reproduces the prefill's lane arithmetic (the
// same fused multiply-adds in the same order, the same two-chain sums, the
// same 2^x and merges), so a row gets the same bits on either path. One
// exception, for speed: decoding one token (Lq = 1, a GQA group of at most
// kAcrossDMaxRows query heads per KV head) with no lse asked for, the
// scores sum across the head dimension in lanes (scores_across_d), which
// rounds differently. Either way a row's bits depend only on its own
// (batch, head): a sequence decoded alone equals the same sequence inside
// a larger batch.

constexpr int64_t kDecodeMaxQueries = 4;
constexpr int kKeyTiles = 4;  // W-key tiles scored together (independent chains)
// Query rows per task up to which one token's scores sum across the head
// dimension (see scores_across_d).
constexpr int64_t kAcrossDMaxRows = 4;
// How far ahead the one-token scores and P V fetch the keys and values
// they will read into L1: two W-key tiles, 32 value rows. The hardware
// prefetchers alone left a thread at ~24 GB/s from memory where a plain
// sum reads 37; with these, (8, 12, 1, 4096, 64) float32 went from 28-36
// to 33-46 GB/s at 2 threads and (8, 32/8, 1, 4096, 128) from 23-26 to
// 30-31 (alternating processes; 1 or 4 tiles and 16 or 64 rows alike).
// BENCHMARKS.md, "Decode prefetch".
constexpr int kPrefetchTiles = 2;
constexpr int kPrefetchRows = 32;

// Prefetches `bytes` from `at` into L1 (a row of keys or values).
inline void prefetch_row(const void* at, int64_t bytes) {
  const char* c = static_cast<const char*>(at);
  for (int64_t x = 0; x < bytes; x += 64) __builtin_prefetch(c + x, 0, 3);
}

template <typename T>
struct DecodeShape {
  using Tl = PrefillTiling<T>;
  static constexpr int W = Simd<T>::W;
  int64_t rows;     // query rows per task: group * Lq
  int64_t bc;       // keys per block: the prefill's, so blocks coincide
  int64_t chunk;    // keys per chunk
  int64_t chunks;   // chunks per (batch, KV head)
  int64_t dvw;      // Dv rounded up to W
  int64_t part;     // values per row in a partial state: o[dvw], m, l, padding
  bool v_direct;    // V rows usable in place by vector loads
  bool round;       // bf16 products: operands rounded to bf16 values (float32 only)

  explicit DecodeShape(const AttentionParams& p) {
    const Tl t(p);
    rows = p.group_size() * p.Lq;
    bc = t.bc;
    chunk = bc * kChunkBlocks;
    chunks = (p.Lk + chunk - 1) / chunk;
    dvw = Tl::round_up(std::max<int64_t>(p.Dv, 1), W);
    part = dvw + W;  // a multiple of W keeps every o aligned
    v_direct = p.v_stride.c == 1 && p.Dv % W == 0 && !p.kv_narrow();
    round = p.products == Products::bf16;
  }
};

// Scalar helpers that round exactly like one lane of the vector code.
template <typename T>
inline T lane_exp_diff(T a, T b) {
  using S = Simd<T>;
  return S::first(vec_exp_diff<S>(S::set1(a), S::set1(b)));
}
template <typename T>
inline T lane_fmadd(T a, T b, T c) {
  using S = Simd<T>;
  return S::first(S::fmadd(S::set1(a), S::set1(b), S::set1(c)));
}
template <typename T>
inline T lane_max(T a, T b) {
  using S = Simd<T>;
  return S::first(S::max(S::set1(a), S::set1(b)));
}

// kRound (bf16 products, T float): the widened method, as the prefill's
// portable path runs it (on the bf16-dot path the across-D scores run on
// pairs instead: pair_scores below): q rounded to bf16 before it is
// scaled, each key and value rounded as it is loaded (exact for a bf16
// cache), the exponentials to bf16 accuracy (vec_exp_diff_bf16), P
// rounded after their float32 sum is taken; so the products are exact
// products of bf16 values, summed in float32 in the float32 order.
// A decode step stays bound by reading the cache: no conversion pass.
template <typename T, typename KV, bool kRound = false>
struct DecodeTask {
  using S = Simd<T>;
  using reg = typename S::reg;
  static constexpr int W = S::W;
  const AttentionParams& p;
  const DecodeShape<T>& ds;
  ScoreMask<T> mask;
  int64_t b, hk, c;
  T* part;  // rows x ds.part: this task's partial states
  Arena& arena;
  // kt: kKeyTiles transposed key tiles, D x W each; s: rows x bcw scores of
  // the current block.
  T *qs, *kt, *vbuf, *s;
  T* krows;               // W widened key rows (narrow storage only)
  uint8_t* visible;
  uint16_t* qbf;          // rows x D: the queries rounded to bf16, unscaled (pair_scores)

  DecodeTask(const AttentionParams& p_, const DecodeShape<T>& ds_, int64_t b_, int64_t hk_,
             int64_t c_, T* part_, Arena& arena_)
      : p(p_), ds(ds_), mask(p_, b_), b(b_), hk(hk_), c(c_), part(part_), arena(arena_) {
    const size_t bcw = PrefillTiling<T>::round_up(ds.bc, W);
    arena.reset(sizeof(T) * (ds.rows * p.D + (1 + kKeyTiles) * p.D * W + bcw * ds.dvw +
                             ds.rows * bcw) +
                ds.bc + sizeof(uint16_t) * ds.rows * p.D + 6 * 64);
    krows = arena.carve<T>(p.D * W);
    qs = arena.carve<T>(ds.rows * p.D);
    kt = arena.carve<T>(kKeyTiles * p.D * W);
    vbuf = arena.carve<T>(bcw * ds.dvw);
    s = arena.carve<T>(ds.rows * bcw);
    visible = arena.carve<uint8_t>(ds.bc);
    qbf = arena.carve<uint16_t>(ds.rows * p.D);
  }

  int64_t head_of(int64_t r) const { return hk * p.group_size() + r / p.Lq; }
  int64_t query_of(int64_t r) const { return r % p.Lq; }

  // Query rows scaled exactly as the prefill packs them.
  void pack_queries() {
    const T factor = static_cast<T>(p.scale);
    for (int64_t r = 0; r < ds.rows; ++r) {
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + head_of(r) * p.q_stride.h +
                   query_of(r) * p.q_stride.r;
      for (int64_t x = 0; x < p.D; ++x) qs[r * p.D + x] = operand(q[x * p.q_stride.c]) * factor;
      if constexpr (kPairsInLanes)
        for (int64_t x = 0; x < p.D; ++x) qbf[r * p.D + x] = bf16_round(q[x * p.q_stride.c]);
    }
  }

  // bf16 products on the bf16-dot path, one query row per KV head
  // (scores_across_d): the scores by vdpbf16ps on pairs along D, each
  // key row rounded into pairs by one conversion per 2W values (a bf16
  // cache's row already is pairs), then scaled: half the multiply-adds of
  // the widened method, and no rounding sequence per value. Rounding every
  // key of a float32 cache the widened way made the step compute-bound:
  // (8, 12, 1, 1024, 64) 1.05 ms in float32, 1.46 ms; on pairs 1.0 ms
  // against 0.90 (BENCHMARKS.md).
  static constexpr bool kPairsInLanes = kRound && Simd<float>::kBf16Dot;  // (kRound: T float)
  bool pair_scores() const { return kPairsInLanes && p.D % (2 * W) == 0; }
  template <typename KT>
  reg row_scores_pairs(const KT* k, int64_t ldk, const uint16_t* qb) const {
    const reg s = keys_across_d(k, ldk, [&](const KT* row) {
      reg acc = S::zero();
      for (int64_t x0 = 0; x0 < p.D; x0 += 2 * W)
        acc = S::dot_bf16(acc, key_pairs(row + x0),
                          S::loadu(reinterpret_cast<const float*>(qb + x0)));
      return acc;
    });
    return S::mul(s, S::set1(static_cast<T>(p.scale)));
  }
  // 2W values of a key row as W bf16 pairs in memory order.
  static reg key_pairs(const T* x) { return S::bf16_pack(S::loadu(x), S::loadu(x + W)); }
  static reg key_pairs(const Half* x) { return S::bf16_pack(load_row(x), load_row(x + W)); }
  static reg key_pairs(const Bf16* x) { return S::loadu(reinterpret_cast<const float*>(x)); }

  // A product's operand: itself, or rounded to a bf16 value (kRound).
  // Keys and values of a bf16 cache are bf16 values already.
  static constexpr bool kRoundKV = kRound && !std::is_same<KV, Bf16>::value;
  template <bool kDo = kRound>
  static T operand(T x) {
    if constexpr (kDo)
      return bf16_value(x);
    else
      return x;
  }
  template <bool kDo = kRound>
  static reg operand(reg x) {
    if constexpr (kDo)
      return S::bf16_values(x);
    else
      return x;
  }

  // Narrow storage (half, bf16) that vector loads widen as they read
  // (F16C's conversion; a shift for bf16): no widening pass into a buffer.
  static constexpr bool kWidenInRegisters = !std::is_same<KV, T>::value && S::kHalfTile;

  // dst[x][t] = k[t][x] for n <= W keys (zero lanes past n): by W x W
  // register transposes where the keys are whole and unit-stride (narrow
  // keys widened in the same registers).
  void transpose_keys(const KV* k, int64_t n, T* dst) {
    int64_t x = 0;
    if (n == W && p.k_stride.c == 1) {
      if constexpr (std::is_same<KV, T>::value) {
        for (; x + W <= p.D; x += W) S::transpose_tile(k + x, p.k_stride.r, dst + x * W);
      } else if constexpr (kWidenInRegisters) {
        const uint16_t* kh = reinterpret_cast<const uint16_t*>(k);
        for (; x + W <= p.D; x += W) {
          if constexpr (std::is_same<KV, Half>::value)
            S::transpose_tile_half(kh + x, p.k_stride.r, dst + x * W);
          else
            S::transpose_tile_bf16(kh + x, p.k_stride.r, dst + x * W);
        }
      } else {  // widen the W rows into a float tile first, then transpose
        for (int t = 0; t < W; ++t) widen_row(k + t * p.k_stride.r, p.D, krows + t * p.D);
        for (; x + W <= p.D; x += W) S::transpose_tile(krows + x, p.D, dst + x * W);
      }
    }
    for (int t = 0; t < W; ++t) {
      const KV* row = k + t * p.k_stride.r;
      for (int64_t xx = x; xx < p.D; ++xx)
        dst[xx * W + t] = t < n ? static_cast<T>(widen(row[xx * p.k_stride.c])) : T(0);
    }
    if constexpr (kRoundKV)
      for (int64_t xx = 0; xx < p.D; ++xx) S::store(dst + xx * W, operand(S::load(dst + xx * W)));
  }

  // One token per query head (decoding: Lq = 1) and few rows per task (no
  // GQA group, or a group of at most kAcrossDMaxRows): lanes run across the
  // head dimension instead of across keys: one chain per key over the
  // D / W vectors of its row, then a fixed tree adds each key's lanes
  // (S::lane_sums), each row in turn over the same W keys (in L1 after
  // the first). No transposes, whose shuffles bound this case: measured
  // (B = 8, 16 query heads over 8 KV heads, 4096 keys, D = 128), 17 GB/s
  // with them, the memory's 25 without (BENCHMARKS.md, "Decode"). The
  // same accuracy; the dot products round differently from the prefill's
  // chains, so this case agrees with the prefill to round-off, not bitwise.
  // Not when the lse is asked for: a backward recomputes the weights as
  // e^(s - lse) with the prefill's chains, and only the same score bits
  // cancel in that difference (else a dominant key's weight carries its
  // score's rounding, |s| ulp, where the softmax itself is off by far less).
  // Half keys without in-register widening (the portable path) are widened
  // into krows first, so float and half caches give the same bits.
  bool scores_across_d() const {
    return p.Lq == 1 && ds.rows <= kAcrossDMaxRows && !p.lse && p.k_stride.c == 1 &&
           p.D > 0 && p.D % W == 0;
  }

  // The scores of query q against the W whole keys at k, NX = D / W
  // vectors per key: the query's vectors stay in registers and each key row
  // is read front to back, one chain per key.
  template <int NX, typename KT>
  reg row_scores_across_d(const KT* k, int64_t ldk, const T* q) const {
    reg qv[NX];
    TILEATTN_UNROLL
    for (int x = 0; x < NX; ++x) qv[x] = S::loadu(q + x * W);
    return keys_across_d(k, ldk, [&](const KT* row) {
      reg acc = S::mul(operand<kRoundKV>(load_row(row)), qv[0]);
      TILEATTN_UNROLL
      for (int x = 1; x < NX; ++x)
        acc = S::fmadd(operand<kRoundKV>(load_row(row + x * W)), qv[x], acc);
      return acc;
    });
  }
  // The same for any D multiple of W (the query read from L1).
  template <typename KT>
  reg row_scores_across_d_any(const KT* k, int64_t ldk, const T* q) const {
    return keys_across_d(k, ldk, [&](const KT* row) {
      reg acc = S::mul(operand<kRoundKV>(load_row(row)), S::loadu(q));
      for (int64_t x0 = W; x0 < p.D; x0 += W)
        acc = S::fmadd(operand<kRoundKV>(load_row(row + x0)), S::loadu(q + x0), acc);
      return acc;
    });
  }
  // The scores of the W keys at k across the head dimension: `chain(row)`
  // is one key's chain over its D values (one register of partial sums);
  // a fixed tree then adds each key's lanes. Each key a tile ahead is
  // prefetched as its row is read.
  template <typename KT, typename Chain>
  reg keys_across_d(const KT* k, int64_t ldk, Chain chain) const {
    reg acc[W];
    TILEATTN_UNROLL
    for (int t = 0; t < W; ++t) {
      const KT* row = k + t * ldk;
      prefetch_row(row + kPrefetchTiles * W * ldk, p.D * static_cast<int64_t>(sizeof(KT)));
      acc[t] = chain(row);
    }
    return S::lane_sums(acc);
  }
  // Every row's scores of the block's whole W-key tiles at k (row r's at
  // s + r * ldt); returns how many keys that covered (the rest go through
  // the transposes).
  template <int NX>
  int64_t row_scores_loop(const KV* k, int64_t cols, int64_t ldt) {
    int64_t jj = 0;
    for (; jj + W <= cols; jj += W) {
      const KV* kt = k + jj * p.k_stride.r;
      const auto each_row = [&](const auto* keys, int64_t ldk) {
        for (int64_t r = 0; r < ds.rows; ++r) {
          const T* q = qs + r * p.D;
          if constexpr (kPairsInLanes) {
            if (pair_scores()) {
              S::store(s + r * ldt + jj, row_scores_pairs(keys, ldk, qbf + r * p.D));
              continue;
            }
          }
          S::store(s + r * ldt + jj, NX ? row_scores_across_d<NX ? NX : 1>(keys, ldk, q)
                                        : row_scores_across_d_any(keys, ldk, q));
        }
      };
      // Narrow keys the registers cannot widen as they load (the portable
      // path): widened into krows first.
      if constexpr (!std::is_same<KV, T>::value && !kWidenInRegisters) {
        for (int t = 0; t < W; ++t) widen_row(kt + t * p.k_stride.r, p.D, krows + t * p.D);
        each_row(static_cast<const T*>(krows), p.D);
      } else {
        each_row(kt, p.k_stride.r);
      }
    }
    return jj;
  }
  int64_t row_scores(const KV* k, int64_t cols, int64_t ldt) {
    switch (p.D / W) {
      case 1: return row_scores_loop<1>(k, cols, ldt);
      case 2: return row_scores_loop<2>(k, cols, ldt);
      case 4: return row_scores_loop<4>(k, cols, ldt);
      case 8: return row_scores_loop<8>(k, cols, ldt);
      case 16: return row_scores_loop<16>(k, cols, ldt);
      default: return row_scores_loop<0>(k, cols, ldt);
    }
  }

  // out[g * W + lane] = q . key (G tiles of W keys in kt): the prefill's
  // chain per lane (segments of kScoreSegment, added in order); the G
  // independent chains hide the fused multiply-add latency.
  template <int G>
  void score_tiles(const T* q, T* out) const {
    reg total[G];
    for (int64_t x0 = 0; x0 == 0 || x0 < p.D; x0 += kScoreSegment) {
      const int64_t x1 = std::min(p.D, x0 + kScoreSegment);
      reg acc[G];
      TILEATTN_UNROLL
      for (int g = 0; g < G; ++g) acc[g] = S::zero();
      for (int64_t x = x0; x < x1; ++x) {
        const reg qx = S::set1(q[x]);
        TILEATTN_UNROLL
        for (int g = 0; g < G; ++g) acc[g] = S::fmadd(qx, S::load(kt + (g * p.D + x) * W), acc[g]);
      }
      TILEATTN_UNROLL
      for (int g = 0; g < G; ++g) total[g] = x0 == 0 ? acc[g] : S::add(total[g], acc[g]);
    }
    TILEATTN_UNROLL
    for (int g = 0; g < G; ++g) S::store(out + g * W, total[g]);
  }

  // Scores of every row for the block's keys, kKeyTiles * W keys at a time:
  // each W keys are transposed into a tile of kt[x][lane] (D x W, together
  // small enough for L1), then each row scores them with lanes across keys.
  // Lanes past cols are overwritten by the mask.
  void block_scores(int64_t j0, int64_t cols) {
    const KV* k = static_cast<const KV*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h +
                 j0 * p.k_stride.r;
    const int64_t ldt = PrefillTiling<T>::round_up(ds.bc, W);
    int64_t jj = 0;
    if (scores_across_d()) jj = row_scores(k, cols, ldt);
    for (; jj < cols; jj += kKeyTiles * W) {
      const int tiles = static_cast<int>(
          std::min<int64_t>(kKeyTiles, (cols - jj + W - 1) / W));
      for (int g = 0; g < tiles; ++g)
        transpose_keys(k + (jj + g * W) * p.k_stride.r,
                       std::min<int64_t>(W, cols - jj - g * W), kt + g * p.D * W);
      for (int64_t r = 0; r < ds.rows; ++r) {
        const T* q = qs + r * p.D;
        T* out = s + r * ldt + jj;
        switch (tiles) {
          case 4: score_tiles<4>(q, out); break;
          case 3: score_tiles<3>(q, out); break;
          case 2: score_tiles<2>(q, out); break;
          default: score_tiles<1>(q, out); break;
        }
      }
    }
  }

  // Narrow values whose rows vector loads can widen in place (no vbuf pass).
  bool narrow_v_direct() const {
    return kWidenInRegisters && p.v_stride.c == 1 && p.Dv % W == 0;
  }
  const KV* value_head(int64_t j0) const {
    return static_cast<const KV*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h + j0 * p.v_stride.r;
  }

  const T* value_rows(int64_t j0, int64_t cols, int64_t* ldv) {
    const KV* v = value_head(j0);
    if (ds.v_direct) {
      *ldv = p.v_stride.r;
      return reinterpret_cast<const T*>(v);  // KV is T here
    }
    for (int64_t jj = 0; jj < cols; ++jj) {
      T* dst = vbuf + jj * ds.dvw;
      const KV* src = v + jj * p.v_stride.r;
      int64_t e = 0;
      if constexpr (!std::is_same<KV, T>::value) {
        if (p.v_stride.c == 1) {
          widen_row(src, p.Dv, dst);
          e = p.Dv;
        }
      }
      for (; e < ds.dvw; ++e) dst[e] = e < p.Dv ? static_cast<T>(widen(src[e * p.v_stride.c])) : T(0);
    }
    *ldv = ds.dvw;
    return vbuf;
  }

  // The prefill's masks on one row's scores; lanes past cols (garbage from
  // the last key tile) become -inf, so they add nothing to the row.
  void mask_row(T* s, int64_t r, int64_t j0, int64_t cols, int64_t ldt) {
    mask.template apply<ScoreLayout::rows_major>(
        s, ldt, ScoreTile{head_of(r), query_of(r), 1, 1, j0, cols}, visible, false);
    std::fill(s + cols, s + ldt, -std::numeric_limits<T>::infinity());
  }

  // One block for one row: online softmax update and o = o * alpha + P V.
  template <typename VT>
  void row_block(T* s, T* st, int64_t cols, int64_t ldt, const VT* v, int64_t ldv) {
    row_softmax(s, st, cols, ldt);
    row_values(s, st, cols, v, ldv);
  }

  // The softmax part of row_block: m, l and o * alpha updated, s turned
  // into P (rounded for the P V product with bf16 products).
  void row_softmax(T* s, T* st, int64_t cols, int64_t ldt) {
    T* o = st;
    T& m = st[ds.dvw];
    T& l = st[ds.dvw + 1];
    reg vmax = S::set1(-std::numeric_limits<T>::infinity());
    for (int64_t jj = 0; jj < ldt; jj += W) vmax = S::max(vmax, S::load(s + jj));
    const T m_new = lane_max<T>(m, S::hmax(vmax));
    const T mu = lane_max<T>(m_new, std::numeric_limits<T>::lowest());
    const T alpha = lane_exp_diff<T>(m, mu);
    const reg vmu = S::set1(mu);
    for (int64_t jj = 0; jj < ldt; jj += W) {
      const reg x = S::load(s + jj);  // bf16 products: the prefill's bf16-accurate exponential
      S::store(s + jj, kRound ? vec_exp_diff_bf16<S>(x, vmu) : vec_exp_diff_unclamped<S>(x, vmu));
    }
    // The sum in the prefill's order (BlockSum), so both paths agree bitwise.
    const auto add = [](T a, T b) { return a + b; };
    BlockSum<T, 1, decltype(add)> sum(0, T(0), add);
    while (sum.next() < cols) {
      const int64_t end = sum.leaf_end(cols);
      T acc = T(0);
      for (int64_t jj = sum.next(); jj < end; ++jj) acc = acc + s[jj];
      sum.push(&acc, end);
    }
    l = lane_fmadd<T>(l, alpha, sum.total(0));
    m = m_new;
    if constexpr (kRound)  // P for the P V product (l is of the unrounded values)
      for (int64_t jj = 0; jj < ldt; jj += W) S::store(s + jj, operand(S::load(s + jj)));
    const reg va = S::set1(alpha);
    for (int64_t e = 0; e < ds.dvw; e += W) S::store(o + e, S::mul(S::load(o + e), va));
  }

  // o += P V in the prefill's segments of kValueSegment keys
  // (values_micro): each segment summed from zero in registers, then added
  // to o.
  template <typename VT>
  void row_values(const T* pr, T* o, int64_t cols, const VT* v, int64_t ldv) {
    for (int64_t j0 = 0; j0 < cols; j0 += kValueSegment)
      segment_values(pr, j0, std::min(cols, j0 + kValueSegment), v, ldv, o);
  }

  // The P V of R rows of a GQA group at once (pw: row r's P at
  // pw + r * ldt, o: its output at o + r * ds.part): each value vector is
  // loaded (and, with bf16 products, rounded) once for the R rows instead
  // of once per row. Every output element's chain is the one row_values
  // forms (same segments, same order), so the bits are the same; a segment
  // where some row has a zero weight goes through row_values' per-row
  // skip. Rounding each value per row had made a group of 4 over a float32
  // cache 1.24x (avx512) and 1.69x (avx2) the float32 step (BENCHMARKS.md,
  // "Decode prefetch").
  template <int R, typename VT>
  void group_values(const T* pw, int64_t ldt, T* o, int64_t cols, const VT* v, int64_t ldv) {
    constexpr int NE = S::kRegisters >= 32 ? 4 : 2;  // R * NE accumulators
    for (int64_t j0 = 0; j0 < cols; j0 += kValueSegment) {
      const int64_t j1 = std::min(cols, j0 + kValueSegment);
      bool any_zero = false;
      for (int r = 0; r < R; ++r)
        for (int64_t j = j0; j < j1; ++j) any_zero |= pw[r * ldt + j] == T(0);
      if (any_zero) {
        for (int r = 0; r < R; ++r) segment_values(pw + r * ldt, j0, j1, v, ldv, o + r * ds.part);
        continue;
      }
      int64_t e = 0;
      for (; e + NE * W <= ds.dvw; e += NE * W)
        group_segment<R, NE>(pw, ldt, j0, j1, v, ldv, e, o);
      for (; e < ds.dvw; e += W) group_segment<R, 1>(pw, ldt, j0, j1, v, ldv, e, o);
    }
  }
  template <int R, int NE, typename VT>
  void group_segment(const T* pw, int64_t ldt, int64_t j0, int64_t j1, const VT* v,
                     int64_t ldv, int64_t e, T* o) const {
    reg acc[R][NE];
    TILEATTN_UNROLL
    for (int r = 0; r < R; ++r)
      TILEATTN_UNROLL
      for (int u = 0; u < NE; ++u) acc[r][u] = S::zero();
    for (int64_t j = j0; j < j1; ++j) {
      const VT* vr = v + j * ldv + e;
      prefetch_row(vr + kPrefetchRows * ldv, NE * W * static_cast<int64_t>(sizeof(VT)));
      reg vv[NE];
      TILEATTN_UNROLL
      for (int u = 0; u < NE; ++u) vv[u] = operand<kRoundKV>(load_row(vr + u * W));
      TILEATTN_UNROLL
      for (int r = 0; r < R; ++r) {
        const reg pj = S::set1(pw[r * ldt + j]);
        TILEATTN_UNROLL
        for (int u = 0; u < NE; ++u) acc[r][u] = S::fmadd(vv[u], pj, acc[r][u]);
      }
    }
    TILEATTN_UNROLL
    for (int r = 0; r < R; ++r)
      TILEATTN_UNROLL
      for (int u = 0; u < NE; ++u) {
        T* out = o + r * ds.part + e + u * W;
        S::store(out, S::add(S::load(out), acc[r][u]));
      }
  }
  // One row's segment [j0, j1) of P V over the whole row of values.
  template <typename VT>
  void segment_values(const T* pr, int64_t j0, int64_t j1, const VT* v, int64_t ldv, T* o) {
    int64_t e = 0;
    for (; e + 8 * W <= ds.dvw; e += 8 * W) pv_segment<8>(pr, j0, j1, v, ldv, e, o);
    for (; e + 4 * W <= ds.dvw; e += 4 * W) pv_segment<4>(pr, j0, j1, v, ldv, e, o);
    for (; e < ds.dvw; e += W) pv_segment<1>(pr, j0, j1, v, ldv, e, o);
  }

  // All rows' blocks: each row's softmax, then P V, by groups of up to 4
  // rows sharing the value loads when the values are rounded per load
  // (bf16 products over a float32 or float16 cache).
  template <typename VT>
  void rows_block(int64_t cols, int64_t ldt, const VT* v, int64_t ldv) {
    const auto pr = [&](int64_t r) { return s + r * ldt; };
    const auto st = [&](int64_t r) { return part + r * ds.part; };
    if (!(kRoundKV && ds.rows > 1)) {
      for (int64_t r = 0; r < ds.rows; ++r) row_block(pr(r), st(r), cols, ldt, v, ldv);
      return;
    }
    for (int64_t r = 0; r < ds.rows; ++r) row_softmax(pr(r), st(r), cols, ldt);
    int64_t r = 0;
    for (; r + 4 <= ds.rows; r += 4) group_values<4>(pr(r), ldt, st(r), cols, v, ldv);
    switch (ds.rows - r) {
      case 3: group_values<3>(pr(r), ldt, st(r), cols, v, ldv); break;
      case 2: group_values<2>(pr(r), ldt, st(r), cols, v, ldv); break;
      case 1: row_values(pr(r), st(r), cols, v, ldv); break;
      default: break;
    }
  }

  // W elements of a key or value row, widened from half precision.
  static reg load_row(const T* x) { return S::loadu(x); }
  static reg load_row(const Half* x) {
    if constexpr (S::kHalfTile) return S::loadu_half(reinterpret_cast<const uint16_t*>(x));
    return S::zero();  // unreachable: callers check kWidenInRegisters
  }
  static reg load_row(const Bf16* x) {
    if constexpr (S::kHalfTile) return S::loadu_bf16(reinterpret_cast<const uint16_t*>(x));
    return S::zero();  // unreachable: callers check kWidenInRegisters
  }

  // o[e, e + NE W) += sum over keys j in [j0, j1) of p[j] v[j][e, e + NE W),
  // chained from zero in NE registers. p = 0 adds nothing (the prefill's
  // 0 * v, or its NaN-safe skip): skipped, so a NaN value of a key this row
  // cannot see stays out.
  template <int NE, typename VT>
  static void pv_segment(const T* pr, int64_t j0, int64_t j1, const VT* v, int64_t ldv,
                         int64_t e, T* o) {
    reg acc[NE];
    TILEATTN_UNROLL
    for (int u = 0; u < NE; ++u) acc[u] = S::zero();
    bool any_zero = false;  // checked once per segment: the common case needs no branch per key
    for (int64_t j = j0; j < j1; ++j) any_zero |= pr[j] == T(0);
    for (int64_t j = j0; j < j1; ++j) {
      const VT* vr = v + j * ldv + e;
      prefetch_row(vr + kPrefetchRows * ldv, NE * W * static_cast<int64_t>(sizeof(VT)));
      if (any_zero && pr[j] == T(0)) continue;
      const reg pj = S::set1(pr[j]);
      TILEATTN_UNROLL
      for (int u = 0; u < NE; ++u)
        acc[u] = S::fmadd(operand<kRoundKV>(load_row(vr + u * W)), pj, acc[u]);
    }
    TILEATTN_UNROLL
    for (int u = 0; u < NE; ++u)
      S::store(o + e + u * W, S::add(S::load(o + e + u * W), acc[u]));
  }

  void run() {
    const int64_t ldt = PrefillTiling<T>::round_up(ds.bc, W);
    for (int64_t r = 0; r < ds.rows; ++r) {
      T* st = part + r * ds.part;
      std::fill(st, st + ds.part, T(0));
      st[ds.dvw] = -std::numeric_limits<T>::infinity();
    }
    // The union of the rows' visible keys (queries 0 .. Lq-1), in this chunk.
    const KeyBounds& kb = mask.bounds();
    const int64_t c0 = c * ds.chunk, c1 = std::min(kb.lk, c0 + ds.chunk);
    const int64_t span_lo = std::max({c0, kb.lo(0), int64_t(0)});
    const int64_t span_hi = std::min({c1 - 1, kb.hi(p.Lq - 1), kb.lk - 1});
    if (span_lo > span_hi) return;
    pack_queries();
    for (int64_t j0 = span_lo / ds.bc * ds.bc; j0 <= span_hi; j0 += ds.bc) {
      const int64_t cols = std::min(ds.bc, kb.lk - j0);
      cancellation_point();
      if (mask.mark_keys(j0, cols, visible) == 0) continue;
      block_scores(j0, cols);
      if constexpr (kWidenInRegisters) {
        if (narrow_v_direct()) {
          const KV* v = value_head(j0);
          for (int64_t r = 0; r < ds.rows; ++r) mask_row(s + r * ldt, r, j0, cols, ldt);
          rows_block(cols, ldt, v, p.v_stride.r);
          continue;
        }
      }
      int64_t ldv;
      const T* v = value_rows(j0, cols, &ldv);
      for (int64_t r = 0; r < ds.rows; ++r) mask_row(s + r * ldt, r, j0, cols, ldt);
      rows_block(cols, ldt, v, ldv);
    }
  }
};

// Merges the chunk states of one (batch, KV head) in chunk order, exactly as
// the prefill merges them, and writes the output rows (and LSE).
template <typename T>
void decode_merge(const AttentionParams& p, const DecodeShape<T>& ds, int64_t b, int64_t hk,
                  const T* parts, T* run) {
  using S = Simd<T>;
  const int64_t group = p.group_size();
  for (int64_t r = 0; r < ds.rows; ++r) {
    T* o = run;
    T& m = run[ds.dvw];
    T& l = run[ds.dvw + 1];
    m = -std::numeric_limits<T>::infinity();
    l = T(0);
    std::fill(o, o + ds.dvw, T(0));
    for (int64_t c = 0; c < ds.chunks; ++c) {
      const T* st = parts + (c * ds.rows + r) * ds.part;
      const T m_c = st[ds.dvw], l_c = st[ds.dvw + 1];
      const T m_new = lane_max<T>(m, m_c);
      const T mu = lane_max<T>(m_new, std::numeric_limits<T>::lowest());
      const T a = lane_exp_diff<T>(m, mu), cf = lane_exp_diff<T>(m_c, mu);
      l = lane_fmadd<T>(l, a, l_c * cf);
      m = m_new;
      const typename S::reg va = S::set1(a), vc = S::set1(cf);
      for (int64_t e = 0; e < ds.dvw; e += S::W)
        S::store(o + e, S::fmadd(S::load(o + e), va, S::mul(S::load(st + e), vc)));
    }
    const int64_t h = hk * group + r / p.Lq, i = r % p.Lq;
    T* dst = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + i * p.out_stride.r;
    for (int64_t e = 0; e < p.Dv; ++e) dst[e * p.out_stride.c] = l != T(0) ? o[e] / l : T(0);
    if (p.lse) p.lse[b * p.lse_stride.b + h * p.lse_stride.h + i * p.lse_stride.r] = natural_lse(m, l);
  }
}

template <typename T, typename KV>
void decode_forward(const AttentionParams& p) {
  const DecodeShape<T> ds(p);
  const int64_t heads = p.B * p.Hkv;
  const int64_t per_head = ds.chunks * ds.rows * ds.part;
  // Partial states: O(B * Hkv * chunks * rows * Dv), a small multiple of the
  // output, never of Lk.
  T* parts = static_cast<T*>(std::aligned_alloc(64, PrefillTiling<T>::round_up(
      std::max<int64_t>(heads * per_head, 1) * sizeof(T), 64)));
  if (!parts) throw std::bad_alloc();
  struct Free { T* p; ~Free() { std::free(p); } } free_parts{parts};
  parallel_for(heads * ds.chunks, [&](int64_t task, int) {
    static thread_local Arena arena;
    const int64_t bh = task / ds.chunks, c = task % ds.chunks;
    T* part = parts + bh * per_head + c * ds.rows * ds.part;
    if constexpr (std::is_same_v<T, float>) {
      if (ds.round) {
        DecodeTask<T, KV, true>(p, ds, bh / p.Hkv, bh % p.Hkv, c, part, arena).run();
        return;
      }
    }
    DecodeTask<T, KV>(p, ds, bh / p.Hkv, bh % p.Hkv, c, part, arena).run();
  });
  parallel_for(heads, [&](int64_t bh, int) {
    static thread_local Arena arena;
    arena.reset(ds.part * sizeof(T));
    decode_merge<T>(p, ds, bh / p.Hkv, bh % p.Hkv, parts + bh * per_head, arena.carve<T>(ds.part));
  });
}
