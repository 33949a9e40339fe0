// The prefill's two products on bfloat16 operands (compute_dtype
// "bfloat16", AttentionParams::products): S^T = K Q^T and O^T += V^T P^T
// with bf16 pairs (kernel_bf16.h) and float32 sums; the softmax, its running
// max and sum, the rescaling and the output stay float32. A fragment
// included by kernel_prefill.h before PrefillTask, which calls these where
// its K/V type is Bf16Pair: on the path with the bf16 dot product. Paths
// without it run the float32 kernel on operands rounded to bf16 values
// (PrefillTiling::round_bf16): each product of two is exact, the sums run
// in the same order, and the speed is float32's (pairs widened in the
// micro-kernels cost 1.2-1.6x float32's time, bench_bf16_attention.py).
//
// Layouts (pairs run along the summed dimension):
//   Q^T: qt2[x][i] = (q[i][2x], q[i][2x + 1])          dp = ceil(D / 2) rows of BR
//   K:   k2[j][x]  = (k[j][2x], k[j][2x + 1])          rows of dp, converted once per call
//   V:   v2[j][e]  = (v[2j][e], v[2j + 1][e])          rows of dvp, converted once per call
//   P^T: pt2[j][i] = (p[i][2j], p[i][2j + 1])          rounded after the softmax
// Key blocks start at even keys (ScoreMask trims by even counts and bc is
// even), so a block's key pairs are whole pairs of the converted V.
//
// The numerical contract: each score is a float32 sum of exact products of
// bf16 values, then multiplied by `scale` (Q is not scaled before it is
// rounded, which would add a rounding to every score); P is rounded to bf16
// for the P V product while the sum l is of the float32 exponentials. Sums
// run in segments from zero as in the float32 kernel, counted in pairs, so a
// row's bits do not depend on the tiling, the thread count or the batch.

// n values of a row (element stride sc) rounded into (n + 1) / 2 pairs
// (an odd n's last high half 0); W at a time where the row is float32 and
// unit-stride.
template <typename KV>
inline void row_to_pairs(const KV* src, int64_t sc, int64_t n, Bf16Pair* dst) {
  using S = Simd<float>;
  int64_t i = 0;
  if constexpr (std::is_same_v<KV, float>) {
    if (sc == 1)
      for (; i + S::W <= n; i += S::W)
        S::store_bf16(reinterpret_cast<uint16_t*>(dst) + i, S::loadu(src + i));
  }
  for (; i < n; i += 2)
    dst[i / 2] = bf16_pair(bf16_round(widen(src[i * sc])),
                           i + 1 < n ? bf16_round(widen(src[(i + 1) * sc])) : 0);
}

// qt2 = Q^T of the task's rows in pairs, zero for padding rows: W rows at a
// time rounded into rows of pairs (rows2, W x dpw), then transposed by W x W
// tiles (the pairs' bits moved as floats).
template <typename T>
void pack_query_pairs(const AttentionParams& p, const RowRange& rr, int64_t qcols, int64_t dp,
                      Bf16Pair* rows2, Bf16Pair* qt2) {
  using S = Simd<float>;
  constexpr int BR = PrefillTiling<T>::BR, W = S::W;
  const int64_t dpw = (dp + W - 1) / W * W;
  const float* q = static_cast<const float*>(p.q) + rr.b * p.q_stride.b + rr.h * p.q_stride.h +
                   rr.i0 * p.q_stride.r;
  alignas(64) float tile[W * W];
  for (int64_t i0 = 0; i0 < qcols; i0 += W) {
    for (int64_t r = 0; r < W; ++r) {
      Bf16Pair* dst = rows2 + r * dpw;
      const int64_t i = i0 + r;
      if (i < rr.rows) {
        row_to_pairs(q + i * p.q_stride.r, p.q_stride.c, p.D, dst);
        std::fill(dst + dp, dst + dpw, Bf16Pair{});
      } else {
        std::fill(dst, dst + dpw, Bf16Pair{});
      }
    }
    for (int64_t x0 = 0; x0 < dp; x0 += W) {
      S::transpose_tile(reinterpret_cast<const float*>(rows2 + x0), dpw, tile);
      for (int64_t c = 0; c < std::min<int64_t>(W, dp - x0); ++c)
        S::store(reinterpret_cast<float*>(qt2 + (x0 + c) * BR + i0), S::load(tile + c * W));
    }
  }
}

// pt2 = P^T of the block in pairs of keys, rounded to bf16 (an odd last
// key's partner is 0).
template <typename T>
void probabilities_to_pairs(const T* st, int64_t cols, int64_t qcols, Bf16Pair* pt2) {
  using S = Simd<T>;
  constexpr int BR = PrefillTiling<T>::BR, W = S::W;
  for (int64_t j = 0; j < cols; j += 2)
    for (int64_t i = 0; i < qcols; i += W) {
      const typename S::reg lo = S::load(st + j * BR + i);
      const typename S::reg hi = j + 1 < cols ? S::load(st + (j + 1) * BR + i) : S::zero();
      S::store(reinterpret_cast<float*>(pt2 + (j / 2) * BR + i), S::bf16_round_pairs(lo, hi));
    }
}

// Dense copies of K and V of n calls (a variable-length batch's sequences,
// or one call) in element type E, made once per call because every query
// block reads them: per item, k (B, Hkv, k_rows, k_cols) and v (B, Hkv,
// v_rows, v_cols), shapes from shape_of(p); params[i] is item i with k and
// v pointing at them (strides in E). The pool converts one block of bc keys
// of one KV head per task: convert(i, params[i], bh, j0).
// Their memory is kept by the calling thread from call to call up to
// kBf16KeptBytes: fresh pages for every call cost ~770 page faults a call at
// (8, 12, 128, 128, 64), which made the call 2x slower (perf stat -e
// page-faults); a larger call's pages are returned after it.
constexpr size_t kBf16KeptBytes = size_t(64) << 20;

struct KVCopyShape {
  int64_t k_rows, k_cols, v_rows, v_cols;  // per KV head
};

template <typename E>
struct ConvertedKV {
  std::unique_ptr<E[]> own;  // a call too large for the kept buffer
  std::vector<AttentionParams> params;

  template <typename ShapeOf, typename Convert>
  ConvertedKV(const AttentionParams* items, int64_t n, int64_t bc, ShapeOf shape_of,
              Convert convert)
      : params(items, items + n) {
    std::vector<KVCopyShape> shape(static_cast<size_t>(n));
    std::vector<size_t> at(static_cast<size_t>(n) + 1, 0);      // elements before item i
    std::vector<int64_t> first(static_cast<size_t>(n) + 1, 0);  // conversion tasks
    for (int64_t i = 0; i < n; ++i) {
      const AttentionParams& p = items[i];
      const KVCopyShape& s = shape[i] = shape_of(p);
      at[i + 1] = at[i] + static_cast<size_t>(p.B * p.Hkv * (s.k_rows * s.k_cols +
                                                              s.v_rows * s.v_cols)) + 32;
      first[i + 1] = first[i] + p.B * p.Hkv * ((p.Lk + bc - 1) / bc);
    }
    const size_t bytes = sizeof(E) * at[n] + 64;
    E* base;
    if (bytes <= kBf16KeptBytes) {
      static thread_local Arena kept;
      kept.reset(bytes);
      base = kept.carve<E>(at[n]);
    } else {
      own.reset(new E[at[n]]);
      base = own.get();
    }
    for (int64_t i = 0; i < n; ++i) {
      const AttentionParams& p = items[i];
      const KVCopyShape& s = shape[i];
      const int64_t k_head = s.k_rows * s.k_cols, v_head = s.v_rows * s.v_cols;
      params[i].kv_half = params[i].kv_bf16 = false;
      params[i].k = base + at[i];
      params[i].k_stride = {p.Hkv * k_head, k_head, s.k_cols, 1};
      params[i].v = base + at[i] + p.B * p.Hkv * k_head;
      params[i].v_stride = {p.Hkv * v_head, v_head, s.v_cols, 1};
    }
    parallel_for(first[n], [&](int64_t task, int) {
      const int64_t i = std::upper_bound(first.begin(), first.end(), task) - first.begin() - 1;
      const int64_t blocks = (items[i].Lk + bc - 1) / bc, local = task - first[i];
      convert(i, params[i], local / blocks, (local % blocks) * bc);
    });
  }
};

// K and V of n calls rounded into the pair layouts above: per item, k2 (B,
// Hkv, Lk, dp) and v2 (B, Hkv, ceil(Lk / 2), dvp), zero-padded. Whether
// each block of bc keys of V is finite in bf16 is recorded on the way into
// finite[i]. The last argument only names KV (the element type of the
// items' k, v).
struct Bf16Operands : ConvertedKV<Bf16Pair> {
  template <typename KV>
  Bf16Operands(const AttentionParams* items, int64_t n, int64_t dvp, int64_t bc,
               std::vector<FiniteBlocks>& finite, const KV*)
      : ConvertedKV<Bf16Pair>(
            items, n, bc,
            [&](const AttentionParams& p) {
              return KVCopyShape{p.Lk, (p.D + 1) / 2, (p.Lk + 1) / 2, dvp};
            },
            [&](int64_t i, const AttentionParams& to, int64_t bh, int64_t j0) {
              convert_block<KV>(items[i], to, bh, j0, bc, dvp, finite[i]);
            }) {}

  // Keys [j0, j0 + bc) of KV head bh (= b * Hkv + hk) of call p into its
  // pairs (to: p converted), recording whether the block of V is finite.
  template <typename KV>
  static void convert_block(const AttentionParams& p, const AttentionParams& to, int64_t bh,
                            int64_t j0, int64_t bc, int64_t dvp, FiniteBlocks& finite) {
    const int64_t b = bh / p.Hkv, hk = bh % p.Hkv, j1 = std::min(p.Lk, j0 + bc);
    const int64_t dp = (p.D + 1) / 2;
    const KV* k = static_cast<const KV*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h;
    const KV* v = static_cast<const KV*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h;
    Bf16Pair* k2 = const_cast<Bf16Pair*>(static_cast<const Bf16Pair*>(to.k)) + bh * to.k_stride.h;
    Bf16Pair* v2 = const_cast<Bf16Pair*>(static_cast<const Bf16Pair*>(to.v)) + bh * to.v_stride.h;
    const auto value = [](const KV* src, int64_t i, int64_t stride) {
      return bf16_round(widen(src[i * stride]));
    };
    for (int64_t j = j0; j < j1; ++j)
      row_to_pairs(k + j * p.k_stride.r, p.k_stride.c, p.D, k2 + j * dp);
    // V in pairs of keys; whether every value is finite in bf16 (x * 0
    // is 0 for finite x), lane-wise where the rows are unit-stride floats.
    using S = Simd<float>;
    constexpr int W = S::W;
    const bool vector_rows = std::is_same_v<KV, float> && p.v_stride.c == 1;
    const int64_t dv_w = vector_rows ? p.Dv / W * W : 0;
    typename S::reg nonfinite = S::zero();
    bool ok = true;
    for (int64_t j = j0; j < j1; j += 2) {
      Bf16Pair* dst = v2 + (j / 2) * dvp;
      const KV* row0 = v + j * p.v_stride.r;
      const KV* row1 = j + 1 < j1 ? v + (j + 1) * p.v_stride.r : nullptr;
      if constexpr (std::is_same_v<KV, float>) {
        for (int64_t e = 0; e < dv_w; e += W) {
          const auto pairs = S::bf16_round_pairs(S::loadu(row0 + e),
                                                 row1 ? S::loadu(row1 + e) : S::zero());
          nonfinite = S::add(nonfinite, S::mul(S::bf16_low(pairs), S::zero()));
          nonfinite = S::add(nonfinite, S::mul(S::bf16_high(pairs), S::zero()));
          S::storeu(reinterpret_cast<float*>(dst + e), pairs);
        }
      }
      for (int64_t e = dv_w; e < dvp; ++e) {
        const uint16_t lo = e < p.Dv ? value(row0, e, p.v_stride.c) : 0;
        const uint16_t hi = e < p.Dv && row1 ? value(row1, e, p.v_stride.c) : 0;
        ok = ok && (lo & 0x7F80u) != 0x7F80u && (hi & 0x7F80u) != 0x7F80u;
        dst[e] = bf16_pair(lo, hi);
      }
    }
    ok = ok && S::hsum(nonfinite) == 0.0f;
    finite.record(b, hk, j0, ok);
  }
};

// Keys [first, first + n) of one KV head (k_head, v_head: strides of p)
// rounded to bf16 values into dense rows: K rows of k_cols at k_dst, V rows
// of v_cols (zero-padded past Dv) at v_dst. The block conversion of the
// widened method's operands, whether per call (RoundedOperands) or per
// head (RoundedHead).
template <typename T, typename KV>
void round_kv_rows(const AttentionParams& p, const KV* k_head, const KV* v_head, int64_t first,
                   int64_t n, T* k_dst, int64_t k_cols, T* v_dst, int64_t v_cols) {
  copy_rows<T, KV>(k_head + first * p.k_stride.r, p.k_stride.r, p.k_stride.c, n, n, p.D, k_cols,
                   k_dst, /*round_bf16=*/true);
  copy_rows<T, KV>(v_head + first * p.v_stride.r, p.v_stride.r, p.v_stride.c, n, n, p.Dv,
                   v_cols, v_dst, /*round_bf16=*/true);
}

// K and V of n calls rounded to bf16 values in float32, dense (B, Hkv, Lk,
// D) and (B, Hkv, Lk, Dv): the operands of the widened method when many
// query blocks read them (prefill_forward_items_bf16).
struct RoundedOperands : ConvertedKV<float> {
  template <typename KV>
  RoundedOperands(const AttentionParams* items, int64_t n, int64_t bc, const KV*)
      : ConvertedKV<float>(
            items, n, bc,
            [](const AttentionParams& p) { return KVCopyShape{p.Lk, p.D, p.Lk, p.Dv}; },
            [&](int64_t i, const AttentionParams& to, int64_t bh, int64_t j0) {
              const AttentionParams& p = items[i];
              const int64_t b = bh / p.Hkv, hk = bh % p.Hkv, n = std::min(bc, p.Lk - j0);
              float* k = const_cast<float*>(static_cast<const float*>(to.k)) + bh * p.Lk * p.D;
              float* v = const_cast<float*>(static_cast<const float*>(to.v)) + bh * p.Lk * p.Dv;
              round_kv_rows<float, KV>(
                  p, static_cast<const KV*>(p.k) + b * p.k_stride.b + hk * p.k_stride.h,
                  static_cast<const KV*>(p.v) + b * p.v_stride.b + hk * p.v_stride.h, j0, n,
                  k + j0 * p.D, p.D, v + j0 * p.Dv, p.Dv);
            }) {}
};
