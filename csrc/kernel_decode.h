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
// same 2^x and merges), so a row gets the same bits on either path: a
// sequence decoded alone equals the same sequence inside a larger batch.

constexpr int64_t kDecodeMaxQueries = 4;

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

  explicit DecodeShape(const AttentionParams& p) {
    const Tl t(p);
    rows = p.group_size() * p.Lq;
    bc = t.bc;
    chunk = bc * kChunkBlocks;
    chunks = (p.Lk + chunk - 1) / chunk;
    dvw = Tl::round_up(std::max<int64_t>(p.Dv, 1), W);
    part = dvw + W;  // a multiple of W keeps every o aligned
    v_direct = p.v_stride.c == 1 && p.Dv % W == 0 && !p.kv_half;
  }
};

// Scalar helpers that round exactly like one lane of the vector code.
template <typename T>
inline T lane_exp2(T x) {
  using S = Simd<T>;
  return S::first(vec_exp2<S>(S::set1(x)));
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

template <typename T, typename KV>
struct DecodeTask {
  using S = Simd<T>;
  using reg = typename S::reg;
  static constexpr int W = S::W;
  const AttentionParams& p;
  const DecodeShape<T>& ds;
  KeyBounds kb;
  int64_t b, hk, c;
  T* part;  // rows x ds.part: this task's partial states
  Arena& arena;
  T *qs, *kt, *vbuf, *s;  // s: rows x bcw scores of the current block
  T* krows;               // W widened key rows (half-precision storage only)
  uint8_t* visible;

  DecodeTask(const AttentionParams& p_, const DecodeShape<T>& ds_, int64_t b_, int64_t hk_,
             int64_t c_, T* part_, Arena& arena_)
      : p(p_), ds(ds_), kb(p_, b_), b(b_), hk(hk_), c(c_), part(part_), arena(arena_) {
    const size_t bcw = PrefillTiling<T>::round_up(ds.bc, W);
    arena.reset(sizeof(T) * (ds.rows * p.D + 2 * p.D * W + bcw * ds.dvw + ds.rows * bcw) +
                ds.bc + 5 * 64);
    krows = arena.carve<T>(p.D * W);
    qs = arena.carve<T>(ds.rows * p.D);
    kt = arena.carve<T>(p.D * W);
    vbuf = arena.carve<T>(bcw * ds.dvw);
    s = arena.carve<T>(ds.rows * bcw);
    visible = arena.carve<uint8_t>(ds.bc);
  }

  int64_t head_of(int64_t r) const { return hk * p.group_size() + r / p.Lq; }
  int64_t query_of(int64_t r) const { return r % p.Lq; }

  // Query rows scaled exactly as the prefill packs them.
  void pack_queries() {
    const T factor = static_cast<T>(p.scale * kLog2e);
    for (int64_t r = 0; r < ds.rows; ++r) {
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride.b + head_of(r) * p.q_stride.h +
                   query_of(r) * p.q_stride.r;
      for (int64_t x = 0; x < p.D; ++x) qs[r * p.D + x] = q[x * p.q_stride.c] * factor;
    }
  }

  // kt[x][t] = k[t][x] for n <= W keys (zero lanes past n): by W x W
  // register transposes where the keys are whole and unit-stride.
  void transpose_keys(const KV* k, int64_t n) {
    int64_t x = 0;
    if (n == W && p.k_stride.c == 1) {
      if constexpr (std::is_same<KV, T>::value) {
        for (; x + W <= p.D; x += W) S::transpose_tile(k + x, p.k_stride.r, kt + x * W);
      } else {  // widen the W rows into a float tile first, then transpose
        for (int t = 0; t < W; ++t) widen_row(k + t * p.k_stride.r, p.D, krows + t * p.D);
        for (; x + W <= p.D; x += W) S::transpose_tile(krows + x, p.D, kt + x * W);
      }
    }
    for (int t = 0; t < W; ++t) {
      const KV* row = k + t * p.k_stride.r;
      for (int64_t xx = x; xx < p.D; ++xx)
        kt[xx * W + t] = t < n ? static_cast<T>(widen(row[xx * p.k_stride.c])) : T(0);
    }
  }

  // Scores of every row for the block's keys, W keys at a time: the W keys
  // are transposed into kt[x][lane] (D x W, small enough for L1), then each
  // row runs the prefill's fused multiply-add chain over x with lanes
  // across keys. Lanes past cols score 0 (masked later).
  void block_scores(int64_t j0, int64_t cols, int64_t ldt) {
    const KV* k = static_cast<const KV*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h +
                 j0 * p.k_stride.r;
    for (int64_t jj = 0; jj < ldt; jj += W) {
      transpose_keys(k + jj * p.k_stride.r, std::min<int64_t>(W, cols - jj));
      for (int64_t r = 0; r < ds.rows; ++r) {
        const T* q = qs + r * p.D;
        reg acc = S::zero();
        for (int64_t x = 0; x < p.D; ++x) acc = S::fmadd(S::set1(q[x]), S::load(kt + x * W), acc);
        S::store(s + r * ldt + jj, acc);
      }
    }
  }

  const T* value_rows(int64_t j0, int64_t cols, int64_t* ldv) {
    const KV* v = static_cast<const KV*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h +
                  j0 * p.v_stride.r;
    if (ds.v_direct) {
      *ldv = p.v_stride.r;
      return reinterpret_cast<const T*>(v);  // KV is T here
    }
    for (int64_t jj = 0; jj < cols; ++jj) {
      T* dst = vbuf + jj * ds.dvw;
      const KV* src = v + jj * p.v_stride.r;
      int64_t e = 0;
      if constexpr (std::is_same<KV, Half>::value) {
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

  // The prefill's masks, in the prefill's order, on one row's scores.
  void mask_row(T* s, int64_t r, int64_t j0, int64_t cols, int64_t ldt) {
    const T ninf = -std::numeric_limits<T>::infinity();
    const int64_t h = head_of(r), i = query_of(r);
    if (p.mask_kind != MaskKind::none) {
      const int64_t off = b * p.mask_stride.b + h * p.mask_stride.h + i * p.mask_stride.r +
                          j0 * p.mask_stride.c;
      if (p.mask_kind == MaskKind::additive) {
        const T* m = static_cast<const T*>(p.mask) + off;
        for (int64_t jj = 0; jj < cols; ++jj) s[jj] = add_mask(s[jj], m[jj * p.mask_stride.c]);
      } else {
        const uint8_t* m = static_cast<const uint8_t*>(p.mask) + off;
        for (int64_t jj = 0; jj < cols; ++jj)
          if (!m[jj * p.mask_stride.c]) s[jj] = ninf;
      }
    }
    const int64_t lo = std::clamp<int64_t>(kb.lo(i) - j0, 0, cols);
    const int64_t hi = std::clamp<int64_t>(kb.hi(i) - j0 + 1, lo, cols);
    std::fill(s, s + lo, ninf);
    std::fill(s + hi, s + ldt, ninf);
    if (p.key_padding)
      for (int64_t jj = lo; jj < hi; ++jj)
        if (!visible[jj]) s[jj] = ninf;
  }

  // One block for one row: online softmax update and o = o * alpha + P V.
  void row_block(T* s, T* st, int64_t cols, int64_t ldt, const T* v, int64_t ldv) {
    T* o = st;
    T& m = st[ds.dvw];
    T& l = st[ds.dvw + 1];
    reg vmax = S::set1(-std::numeric_limits<T>::infinity());
    for (int64_t jj = 0; jj < ldt; jj += W) vmax = S::max(vmax, S::load(s + jj));
    const T m_new = lane_max<T>(m, S::hmax(vmax));
    const T mu = lane_max<T>(m_new, std::numeric_limits<T>::lowest());
    const T alpha = lane_exp2<T>(m - mu);
    const reg vmu = S::set1(mu);
    for (int64_t jj = 0; jj < ldt; jj += W)
      S::store(s + jj, vec_exp2<S>(S::sub(S::load(s + jj), vmu)));
    T sum0 = T(0), sum1 = T(0);
    int64_t jj = 0;
    for (; jj + 1 < cols; jj += 2) {
      sum0 = sum0 + s[jj];
      sum1 = sum1 + s[jj + 1];
    }
    if (jj < cols) sum0 = sum0 + s[jj];
    l = lane_fmadd<T>(l, alpha, sum0 + sum1);
    m = m_new;
    const reg va = S::set1(alpha);
    for (int64_t e = 0; e < ds.dvw; e += W) S::store(o + e, S::mul(S::load(o + e), va));
    for (int64_t j = 0; j < cols; ++j) {
      // p = 0 adds nothing (the prefill's 0 * v, or its NaN-safe skip): skip
      // it, so a NaN value of a key this row cannot see stays out.
      if (s[j] == T(0)) continue;
      const reg pj = S::set1(s[j]);
      const T* vr = v + j * ldv;
      for (int64_t e = 0; e < ds.dvw; e += W)
        S::store(o + e, S::fmadd(S::loadu(vr + e), pj, S::load(o + e)));
    }
  }

  void run() {
    const int64_t ldt = PrefillTiling<T>::round_up(ds.bc, W);
    for (int64_t r = 0; r < ds.rows; ++r) {
      T* st = part + r * ds.part;
      std::fill(st, st + ds.part, T(0));
      st[ds.dvw] = -std::numeric_limits<T>::infinity();
    }
    // The union of the rows' visible keys (queries 0 .. Lq-1), in this chunk.
    const int64_t c0 = c * ds.chunk, c1 = std::min(kb.lk, c0 + ds.chunk);
    const int64_t span_lo = std::max({c0, kb.lo(0), int64_t(0)});
    const int64_t span_hi = std::min({c1 - 1, kb.hi(p.Lq - 1), kb.lk - 1});
    if (span_lo > span_hi) return;
    pack_queries();
    for (int64_t j0 = span_lo / ds.bc * ds.bc; j0 <= span_hi; j0 += ds.bc) {
      const int64_t cols = std::min(ds.bc, kb.lk - j0);
      cancellation_point();
      if (mark_visible_keys(p, b, j0, cols, visible) == 0) continue;
      block_scores(j0, cols, ldt);
      int64_t ldv;
      const T* v = value_rows(j0, cols, &ldv);
      for (int64_t r = 0; r < ds.rows; ++r) {
        mask_row(s + r * ldt, r, j0, cols, ldt);
        row_block(s + r * ldt, part + r * ds.part, cols, ldt, v, ldv);
      }
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
      const T a = lane_exp2<T>(m - mu), cf = lane_exp2<T>(m_c - mu);
      l = lane_fmadd<T>(l, a, l_c * cf);
      m = m_new;
      const typename S::reg va = S::set1(a), vc = S::set1(cf);
      for (int64_t e = 0; e < ds.dvw; e += S::W)
        S::store(o + e, S::fmadd(S::load(o + e), va, S::mul(S::load(st + e), vc)));
    }
    const int64_t h = hk * group + r / p.Lq, i = r % p.Lq;
    T* dst = static_cast<T*>(p.out) + b * p.out_stride.b + h * p.out_stride.h + i * p.out_stride.r;
    for (int64_t e = 0; e < p.Dv; ++e) dst[e * p.out_stride.c] = l > T(0) ? o[e] / l : T(0);
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
    DecodeTask<T, KV>(p, ds, bh / p.Hkv, bh % p.Hkv, c, parts + bh * per_head + c * ds.rows * ds.part,
                  arena)
        .run();
  });
  parallel_for(heads, [&](int64_t bh, int) {
    static thread_local Arena arena;
    arena.reset(ds.part * sizeof(T));
    decode_merge<T>(p, ds, bh / p.Hkv, bh % p.Hkv, parts + bh * per_head, arena.carve<T>(ds.part));
  });
}
