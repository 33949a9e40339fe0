// The tiled attention forward pass (flash-attention style), written once and
// compiled once per instruction set: kernel_<isa>.cpp defines TILEATTN_ISA_NS,
// includes its simd_<isa>.h, then this file.
//
// For each (batch, query head, block of BR query rows) one task:
//   pack the query block (scaled) into MR-row panels;
//   for each block of BC keys that the causal/window range can reach:
//     pack K^T and V for the block, S = Q K^T with a register-blocked
//     micro-kernel, mask S (only where a mask can hide something),
//     fold S into the running (max, sum) per row and rescale the
//     accumulated output, O += P V with a second micro-kernel;
//   write O / sum and the per-row log-sum-exp.
// The Lq x Lk score matrix never exists: memory is O(threads x tile).
//
// Tile sizes depend only on the instruction set, dtype and head sizes,
// never on the thread count, so every row is computed by the same sequence
// of operations whatever the scheduling: results are bitwise identical for
// any number of threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "attention_params.h"
#include "dropout_hash.h"
#include "simd_exp.h"
#include "thread_pool.h"

namespace tileattn {
namespace TILEATTN_ISA_NS {

template <typename T>
struct Tiling {
  using S = Simd<T>;
  static constexpr int W = S::W;
  static constexpr int MR = S::MR;   // query rows per micro-tile
  static constexpr int NR = 2 * W;   // key (or value) columns per micro-tile
  static constexpr int BR = 96;      // query rows per task; a multiple of MR
  static_assert(BR % MR == 0, "BR must be a multiple of MR");

  int64_t d, dv, dvp;  // head sizes; dvp = dv rounded up to NR
  int64_t bc;          // keys per block; a multiple of NR

  Tiling(int64_t d_, int64_t dv_) : d(d_), dv(dv_) {
    dvp = round_up(std::max<int64_t>(dv, 1), NR);
    // Keep K^T and V of one block (bc * (d + dvp) values) within ~half of a
    // 512 KiB L2 alongside the query block, scores and output accumulators.
    const int64_t bytes_per_key = static_cast<int64_t>(sizeof(T)) * (d + dvp);
    int64_t keys = (192 * 1024) / std::max<int64_t>(bytes_per_key, 1);
    keys = std::max<int64_t>(NR, std::min<int64_t>(256, keys));
    bc = keys / NR * NR;
  }
  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
};

// ---------------------------------------------------------------------------
// Per-thread scratch, grown on demand and reused across calls.
template <typename T>
struct Scratch {
  T* base = nullptr;
  size_t capacity = 0;  // in elements
  T *qp, *kp, *vp, *s, *o, *m, *l, *lse;
  uint8_t* key_visible;
  uint8_t* key_visible_raw = nullptr;
  size_t key_visible_capacity = 0;

  ~Scratch() {
    std::free(base);
    std::free(key_visible_raw);
  }

  void reserve(const Tiling<T>& t) {
    using Tl = Tiling<T>;
    const size_t nq = Tl::BR * t.d, nk = t.bc * t.d, nv = t.bc * t.dvp;
    const size_t ns = Tl::BR * t.bc, no = Tl::BR * t.dvp, nrow = Tl::BR;
    const size_t align = 64 / sizeof(T);
    auto up = [&](size_t x) { return (x + align - 1) / align * align; };
    const size_t need = up(nq) + up(nk) + up(nv) + up(ns) + up(no) + 3 * up(nrow);
    if (need > capacity) {
      std::free(base);
      base = static_cast<T*>(std::aligned_alloc(64, need * sizeof(T)));
      if (!base) {
        capacity = 0;
        throw std::bad_alloc();
      }
      capacity = need;
    }
    T* p = base;
    qp = p; p += up(nq);
    kp = p; p += up(nk);
    vp = p; p += up(nv);
    s = p;  p += up(ns);
    o = p;  p += up(no);
    m = p;  p += up(nrow);
    l = p;  p += up(nrow);
    lse = p;
    if (static_cast<size_t>(t.bc) > key_visible_capacity) {
      std::free(key_visible_raw);
      key_visible_raw = static_cast<uint8_t*>(std::malloc(t.bc));
      if (!key_visible_raw) {
        key_visible_capacity = 0;
        throw std::bad_alloc();
      }
      key_visible_capacity = t.bc;
    }
    key_visible = key_visible_raw;
  }
};

template <typename T>
Scratch<T>& thread_scratch() {
  static thread_local Scratch<T> scratch;
  return scratch;
}

// ---------------------------------------------------------------------------
// Index helpers for the (batch, head, query block) a task owns.
struct RowRange {
  int64_t b, h, hk;  // batch, query head, key/value head
  int64_t i0, rows;  // first query row and how many
};

// Visible keys of query row i are [lo(i), hi(i)] (may be empty or reach
// outside [0, Lk)); both bounds grow with i, which lets a block of rows
// find its key span from its first and last row.
struct KeyBounds {
  int64_t shift, left, right, lk;
  explicit KeyBounds(const AttentionParams& p)
      : shift(p.Lk - p.Lq), left(p.window_left), right(p.window_right), lk(p.Lk) {}
  int64_t lo(int64_t i) const { return left < 0 ? 0 : i + shift - left; }
  int64_t hi(int64_t i) const { return right < 0 ? lk - 1 : i + shift + right; }
};

// ---------------------------------------------------------------------------
// Packing. Qp: panels of MR rows laid out [d][MR], pre-multiplied by the
// scale. Kp: strips of NR keys laid out [d][NR] (K^T). Vp: rows of dvp.
// Padding rows/columns are zeros so the micro-kernels never branch.
template <typename T>
void pack_query(const AttentionParams& p, const Tiling<T>& t, const RowRange& rr, T* qp) {
  constexpr int MR = Tiling<T>::MR;
  const T* q = static_cast<const T*>(p.q) + rr.b * p.q_stride.b + rr.h * p.q_stride.h;
  const T scale = static_cast<T>(p.scale);
  const int64_t panels = (rr.rows + MR - 1) / MR;
  for (int64_t pi = 0; pi < panels; ++pi) {
    T* dst = qp + pi * t.d * MR;
    for (int r = 0; r < MR; ++r) {
      const int64_t row = pi * MR + r;
      if (row < rr.rows) {
        const T* src = q + (rr.i0 + row) * p.q_stride.r;
        for (int64_t d = 0; d < t.d; ++d) dst[d * MR + r] = src[d * p.q_stride.c] * scale;
      } else {
        for (int64_t d = 0; d < t.d; ++d) dst[d * MR + r] = T(0);
      }
    }
  }
}

template <typename T>
void pack_keys(const AttentionParams& p, const Tiling<T>& t, const RowRange& rr, int64_t j0,
               int64_t cols, int64_t cols_padded, T* kp) {
  constexpr int NR = Tiling<T>::NR;
  const T* k = static_cast<const T*>(p.k) + rr.b * p.k_stride.b + rr.hk * p.k_stride.h;
  for (int64_t c = 0; c < cols_padded; ++c) {
    T* dst = kp + (c / NR) * t.d * NR + (c % NR);
    if (c < cols) {
      const T* src = k + (j0 + c) * p.k_stride.r;
      for (int64_t d = 0; d < t.d; ++d) dst[d * NR] = src[d * p.k_stride.c];
    } else {
      for (int64_t d = 0; d < t.d; ++d) dst[d * NR] = T(0);
    }
  }
}

template <typename T>
void pack_values(const AttentionParams& p, const Tiling<T>& t, const RowRange& rr, int64_t j0,
                 int64_t cols, int64_t cols_padded, T* vp) {
  const T* v = static_cast<const T*>(p.v) + rr.b * p.v_stride.b + rr.hk * p.v_stride.h;
  for (int64_t c = 0; c < cols_padded; ++c) {
    T* dst = vp + c * t.dvp;
    int64_t e = 0;
    if (c < cols) {
      const T* src = v + (j0 + c) * p.v_stride.r;
      if (p.v_stride.c == 1) {
        std::memcpy(dst, src, t.dv * sizeof(T));
        e = t.dv;
      } else {
        for (; e < t.dv; ++e) dst[e] = src[e * p.v_stride.c];
      }
    }
    for (; e < t.dvp; ++e) dst[e] = T(0);
  }
}

// ---------------------------------------------------------------------------
// Micro-kernels.

// s[MR][NR] (row stride lds) = qp[d][MR]^T . kp[d][NR]  over d.
template <typename T>
inline void qk_micro(const T* qp, const T* kp, int64_t d, T* s, int64_t lds) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int MR = S::MR, W = S::W, NR = 2 * W;
  reg acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = S::zero();
  for (int64_t x = 0; x < d; ++x) {
    const reg b0 = S::load(kp + x * NR);
    const reg b1 = S::load(kp + x * NR + W);
    const T* a = qp + x * MR;
    for (int r = 0; r < MR; ++r) {
      const reg ar = S::set1(a[r]);
      acc0[r] = S::fmadd(ar, b0, acc0[r]);
      acc1[r] = S::fmadd(ar, b1, acc1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    S::store(s + r * lds, acc0[r]);
    S::store(s + r * lds + W, acc1[r]);
  }
}

// o[MR][NR] (row stride ldo) += p[MR][cols] (row stride ldp) . vp[cols][NR]
// (row stride ldv).
template <typename T>
inline void pv_micro(const T* p, int64_t ldp, const T* vp, int64_t ldv, int64_t cols, T* o,
                     int64_t ldo) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int MR = S::MR, W = S::W;
  reg acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = S::load(o + r * ldo);
    acc1[r] = S::load(o + r * ldo + W);
  }
  for (int64_t j = 0; j < cols; ++j) {
    const reg b0 = S::load(vp + j * ldv);
    const reg b1 = S::load(vp + j * ldv + W);
    for (int r = 0; r < MR; ++r) {
      const reg ar = S::set1(p[r * ldp + j]);
      acc0[r] = S::fmadd(ar, b0, acc0[r]);
      acc1[r] = S::fmadd(ar, b1, acc1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    S::store(o + r * ldo, acc0[r]);
    S::store(o + r * ldo + W, acc1[r]);
  }
}

// S (BR x cols_padded, stride bc) = Qp . Kp for the first `panels` panels.
template <typename T>
void block_scores(const Tiling<T>& t, const T* qp, const T* kp, int64_t panels,
                  int64_t cols_padded, T* s) {
  constexpr int MR = Tiling<T>::MR, NR = Tiling<T>::NR;
  for (int64_t c = 0; c < cols_padded; c += NR) {
    const T* kstrip = kp + (c / NR) * t.d * NR;
    for (int64_t pi = 0; pi < panels; ++pi)
      qk_micro<T>(qp + pi * t.d * MR, kstrip, t.d, s + pi * MR * t.bc + c, t.bc);
  }
}

// O (BR x dvp) += P (BR x cols_padded, stride bc) . Vp.
template <typename T>
void block_accumulate(const Tiling<T>& t, const T* s, const T* vp, int64_t panels,
                      int64_t cols_padded, T* o) {
  constexpr int MR = Tiling<T>::MR, NR = Tiling<T>::NR;
  for (int64_t e = 0; e < t.dvp; e += NR)
    for (int64_t pi = 0; pi < panels; ++pi)
      pv_micro<T>(s + pi * MR * t.bc, t.bc, vp + e, t.dvp, cols_padded, o + pi * MR * t.dvp + e,
                  t.dvp);
}

// ---------------------------------------------------------------------------
// Masking of one block of scores. Only what can hide something is applied:
// the window bounds only on blocks that straddle them, the padding and
// general masks when given, and the padded tail columns always.

// Which keys of [j0, j0 + cols) the key padding mask keeps; returns how many.
inline int64_t mark_visible_keys(const AttentionParams& p, int64_t b, int64_t j0, int64_t cols,
                                 uint8_t* visible) {
  if (!p.key_padding) {
    std::memset(visible, 1, cols);
    return cols;
  }
  const uint8_t* kpm = p.key_padding + b * p.key_padding_stride_b;
  int64_t n = 0;
  for (int64_t c = 0; c < cols; ++c) {
    visible[c] = kpm[(j0 + c) * p.key_padding_stride_k] != 0;
    n += visible[c];
  }
  return n;
}

template <typename T>
void mask_block(const AttentionParams& p, const KeyBounds& kb, const RowRange& rr, int64_t j0,
                int64_t cols, int64_t cols_padded, bool straddles_window,
                const uint8_t* visible, T* s, int64_t lds) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rr.rows; ++r) {
    const int64_t i = rr.i0 + r;
    T* srow = s + r * lds;
    if (p.mask_kind == MaskKind::additive) {
      const T* m = static_cast<const T*>(p.mask) + rr.b * p.mask_stride.b +
                   rr.h * p.mask_stride.h + i * p.mask_stride.r + j0 * p.mask_stride.c;
      for (int64_t c = 0; c < cols; ++c) srow[c] += m[c * p.mask_stride.c];
    } else if (p.mask_kind == MaskKind::boolean) {
      const uint8_t* m = static_cast<const uint8_t*>(p.mask) + rr.b * p.mask_stride.b +
                         rr.h * p.mask_stride.h + i * p.mask_stride.r + j0 * p.mask_stride.c;
      for (int64_t c = 0; c < cols; ++c)
        if (!m[c * p.mask_stride.c]) srow[c] = ninf;
    }
    if (p.key_padding)
      for (int64_t c = 0; c < cols; ++c)
        if (!visible[c]) srow[c] = ninf;
    if (straddles_window) {
      const int64_t lo = std::min(std::max<int64_t>(kb.lo(i) - j0, 0), cols);
      const int64_t hi = std::max<int64_t>(std::min<int64_t>(kb.hi(i) - j0 + 1, cols), lo);
      for (int64_t c = 0; c < lo; ++c) srow[c] = ninf;
      for (int64_t c = hi; c < cols; ++c) srow[c] = ninf;
    }
    for (int64_t c = cols; c < cols_padded; ++c) srow[c] = ninf;
  }
}

// ---------------------------------------------------------------------------
// The online softmax update, the one piece every tiled variant is built on.
// Folds a row's block of scores s[0..n) (n a multiple of W) into its running
// max m and running sum l; overwrites s with exp(s - m_new) and returns the
// factor by which the row's accumulated output must be rescaled. A row that
// has seen only -inf so far keeps m = -inf, l = 0 and gets p = 0 (never NaN).
template <typename T>
inline T online_softmax_update(T* s, int64_t n, T& m, T& l) {
  using S = Simd<T>;
  using reg = typename S::reg;
  constexpr int W = S::W;
  const T ninf = -std::numeric_limits<T>::infinity();
  reg vmax = S::set1(ninf);
  for (int64_t c = 0; c < n; c += W) vmax = S::max(vmax, S::load(s + c));
  const T m_new = std::max(m, S::hmax(vmax));
  if (m_new == ninf) {
    std::memset(s, 0, n * sizeof(T));
    return T(1);
  }
  const T alpha = m == ninf ? T(0) : std::exp(m - m_new);
  const reg vm = S::set1(m_new);
  reg vsum = S::zero();
  for (int64_t c = 0; c < n; c += W) {
    const reg e = vec_exp<S>(S::sub(S::load(s + c), vm));
    S::store(s + c, e);
    vsum = S::add(vsum, e);
  }
  l = l * alpha + S::hsum(vsum);
  m = m_new;
  return alpha;
}

template <typename T>
inline void scale_row(T* o, int64_t n, T factor) {
  using S = Simd<T>;
  const typename S::reg f = S::set1(factor);
  for (int64_t c = 0; c < n; c += S::W) S::store(o + c, S::mul(S::load(o + c), f));
}

// Dropout on one row of (normalised or not) weights: each weight is kept
// with probability 1 - p and scaled by 1 / (1 - p), decided by a hash of
// (seed, batch, head, query, key) so it is the same in every pass and for
// any thread count.
template <typename T>
void dropout_row(const AttentionParams& p, const RowRange& rr, int64_t i, int64_t j0,
                 int64_t cols, T* w) {
  const T keep_scale = p.dropout_p < 1.0 ? static_cast<T>(1.0 / (1.0 - p.dropout_p)) : T(0);
  const uint64_t row_key = ((static_cast<uint64_t>(rr.b) * p.Hq + rr.h) * p.Lq + i) *
                           static_cast<uint64_t>(p.Lk);
  for (int64_t c = 0; c < cols; ++c) {
    const bool drop = dropout_uniform(p.seed, row_key + j0 + c) < p.dropout_p;
    w[c] = drop ? T(0) : w[c] * keep_scale;
  }
}

// ---------------------------------------------------------------------------
// One task: a block of query rows of one (batch, head).

// Calls fn(j0, cols, straddles_window, visible) for each key block the rows
// can see, in increasing order. Blocks outside the causal/window span, and
// blocks whose keys the padding mask hides entirely, are skipped.
template <typename T, typename Fn>
void for_each_key_block(const AttentionParams& p, const Tiling<T>& t, const KeyBounds& kb,
                        const RowRange& rr, uint8_t* visible, Fn&& fn) {
  const int64_t first = rr.i0, last = rr.i0 + rr.rows - 1;
  const int64_t span_lo = std::max<int64_t>(kb.lo(first), 0);
  const int64_t span_hi = std::min<int64_t>(kb.hi(last), p.Lk - 1);
  if (span_lo > span_hi) return;
  for (int64_t j0 = span_lo / t.bc * t.bc; j0 <= span_hi; j0 += t.bc) {
    const int64_t cols = std::min(t.bc, p.Lk - j0);
    if (mark_visible_keys(p, rr.b, j0, cols, visible) == 0) continue;
    const bool inside = kb.lo(last) <= j0 && kb.hi(first) >= j0 + cols - 1;
    fn(j0, cols, !inside, static_cast<const uint8_t*>(visible));
  }
}

template <typename T>
void write_output(const AttentionParams& p, const Tiling<T>& t, const RowRange& rr,
                  const Scratch<T>& sc) {
  T* out = static_cast<T*>(p.out) + rr.b * p.out_stride.b + rr.h * p.out_stride.h;
  for (int64_t r = 0; r < rr.rows; ++r) {
    T* dst = out + (rr.i0 + r) * p.out_stride.r;
    const T l = sc.l[r];
    const T* o = sc.o + r * t.dvp;
    // Divide rather than multiply by 1/l: one rounding instead of two.
    if (l > T(0))
      for (int64_t e = 0; e < t.dv; ++e) dst[e * p.out_stride.c] = o[e] / l;
    else
      for (int64_t e = 0; e < t.dv; ++e) dst[e * p.out_stride.c] = T(0);
    sc.lse[r] = l > T(0) ? sc.m[r] + std::log(l) : -std::numeric_limits<T>::infinity();
  }
  if (p.lse) {
    T* lse = static_cast<T*>(p.lse) + rr.b * p.lse_stride.b + rr.h * p.lse_stride.h;
    for (int64_t r = 0; r < rr.rows; ++r) lse[(rr.i0 + r) * p.lse_stride.r] = sc.lse[r];
  }
}

// Second pass, only when the weights are asked for: recompute each block's
// scores and write exp(s - lse) (after dropout) into the weights array.
template <typename T>
void write_weights(const AttentionParams& p, const Tiling<T>& t, const KeyBounds& kb,
                   const RowRange& rr, int64_t panels, Scratch<T>& sc) {
  constexpr int NR = Tiling<T>::NR;
  T* wbase = static_cast<T*>(p.weights) + rr.b * p.weights_stride.b + rr.h * p.weights_stride.h;
  for_each_key_block<T>(p, t, kb, rr, sc.key_visible,
                        [&](int64_t j0, int64_t cols, bool straddles, const uint8_t* visible) {
    const int64_t cols_padded = Tiling<T>::round_up(cols, NR);
    pack_keys<T>(p, t, rr, j0, cols, cols_padded, sc.kp);
    block_scores<T>(t, sc.qp, sc.kp, panels, cols_padded, sc.s);
    mask_block<T>(p, kb, rr, j0, cols, cols_padded, straddles, visible, sc.s, t.bc);
    for (int64_t r = 0; r < rr.rows; ++r) {
      T* srow = sc.s + r * t.bc;
      const T lse = sc.lse[r];
      for (int64_t c = 0; c < cols; ++c)
        srow[c] = lse == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(srow[c] - lse);
      if (p.dropout_p > 0) dropout_row<T>(p, rr, rr.i0 + r, j0, cols, srow);
      T* wrow = wbase + (rr.i0 + r) * p.weights_stride.r + j0 * p.weights_stride.c;
      for (int64_t c = 0; c < cols; ++c) wrow[c * p.weights_stride.c] = srow[c];
    }
  });
}

template <typename T>
void attention_task(const AttentionParams& p, const Tiling<T>& t, const RowRange& rr) {
  constexpr int MR = Tiling<T>::MR, NR = Tiling<T>::NR;
  Scratch<T>& sc = thread_scratch<T>();
  sc.reserve(t);
  const KeyBounds kb(p);
  const int64_t panels = (rr.rows + MR - 1) / MR;
  pack_query<T>(p, t, rr, sc.qp);
  std::fill(sc.m, sc.m + rr.rows, -std::numeric_limits<T>::infinity());
  std::fill(sc.l, sc.l + rr.rows, T(0));
  std::fill(sc.o, sc.o + panels * MR * t.dvp, T(0));

  for_each_key_block<T>(p, t, kb, rr, sc.key_visible,
                        [&](int64_t j0, int64_t cols, bool straddles, const uint8_t* visible) {
    const int64_t cols_padded = Tiling<T>::round_up(cols, NR);
    pack_keys<T>(p, t, rr, j0, cols, cols_padded, sc.kp);
    pack_values<T>(p, t, rr, j0, cols, cols_padded, sc.vp);
    block_scores<T>(t, sc.qp, sc.kp, panels, cols_padded, sc.s);
    mask_block<T>(p, kb, rr, j0, cols, cols_padded, straddles, visible, sc.s, t.bc);
    for (int64_t r = 0; r < panels * MR; ++r) {
      T* srow = sc.s + r * t.bc;
      if (r >= rr.rows) {  // padding rows of the last panel
        std::memset(srow, 0, cols_padded * sizeof(T));
        continue;
      }
      const T alpha = online_softmax_update<T>(srow, cols_padded, sc.m[r], sc.l[r]);
      if (alpha != T(1)) scale_row<T>(sc.o + r * t.dvp, t.dvp, alpha);
      if (p.dropout_p > 0) dropout_row<T>(p, rr, rr.i0 + r, j0, cols, srow);
    }
    block_accumulate<T>(t, sc.s, sc.vp, panels, cols_padded, sc.o);
  });

  write_output<T>(p, t, rr, sc);
  if (p.weights) write_weights<T>(p, t, kb, rr, panels, sc);
}

// Tasks are handed out largest first: with a causal mask the last query
// blocks see the most keys, and starting them early keeps both cores busy
// to the end (longest-processing-time-first scheduling).
template <typename T>
void attention_forward_typed(const AttentionParams& p) {
  const Tiling<T> t(p.D, p.Dv);
  constexpr int64_t BR = Tiling<T>::BR;
  const int64_t blocks = (p.Lq + BR - 1) / BR;
  const int64_t heads = p.B * p.Hq;
  const int64_t group = p.group_size();
  parallel_for(blocks * heads, [&](int64_t task, int) {
    const int64_t qb = blocks - 1 - task / heads;
    const int64_t bh = task % heads;
    RowRange rr;
    rr.b = bh / p.Hq;
    rr.h = bh % p.Hq;
    rr.hk = rr.h / group;
    rr.i0 = qb * BR;
    rr.rows = std::min(BR, p.Lq - rr.i0);
    attention_task<T>(p, t, rr);
  });
}

void attention_forward(const AttentionParams& p) {
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  if (p.dtype == DType::f64)
    attention_forward_typed<double>(p);
  else
    attention_forward_typed<float>(p);
}

}  // namespace TILEATTN_ISA_NS
}  // namespace tileattn
