// Masking: the one place that knows which keys a query may see and how the
// scores of the others are hidden. Prefill, decode and backward all mask
// through ScoreMask, so a new kind of mask is added here and nowhere else.
//
// The kinds, combined (a key is seen only where every one allows it):
//   - bounds: causal / sliding window (two integers, aligned bottom-right
//     or top-left) and per-item key lengths (keys past them are never read);
//   - key padding: a (B, Lk) byte row set, nonzero = real token;
//   - a general mask broadcast by its strides: boolean (nonzero = may
//     attend) or additive (the compute dtype, added to the score).
//
// Numerical contract: a hidden score becomes -inf, so its probability is an
// exact 0; an additive entry is added with one rounding (add_mask). The
// general mask is applied first, then the structural ones: an additive
// +inf on a key the window hides must still end as -inf, not NaN.
//
// A fragment: attention_kernel.h includes it inside the namespace
// tileattn::<isa>, after kernel_common.h (see there for why).
#pragma once

// Visible keys of query row i are [lo(i), hi(i)] (possibly empty or reaching
// outside [0, Lk)). Both bounds grow with i, so a block of rows finds its
// key span from its first and last row.
struct KeyBounds {
  int64_t shift, left, right, lk;  // lk: the keys batch item b has
  KeyBounds(const AttentionParams& p, int64_t b)
      : left(p.window_left), right(p.window_right),
        lk(p.key_lengths ? p.key_lengths[b] : p.Lk) {
    shift = p.top_left ? 0 : lk - p.Lq;
  }
  int64_t lo(int64_t i) const { return left < 0 ? 0 : i + shift - left; }
  int64_t hi(int64_t i) const { return right < 0 ? lk - 1 : i + shift + right; }
  // The inverse view: key j is visible to queries [first_query(j), last_query(j)].
  int64_t first_query(int64_t j) const {
    return right < 0 ? std::numeric_limits<int64_t>::min() / 2 : j - shift - right;
  }
  int64_t last_query(int64_t j) const {
    return left < 0 ? std::numeric_limits<int64_t>::max() / 2 : j - shift + left;
  }
};

// How a tile of scores lies in memory: element (query i, key jj) at
// s[jj * ld + i] (keys_major: the prefill's transposed scores, queries in
// lanes) or s[i * ld + jj] (rows_major: decode and backward).
enum class ScoreLayout { keys_major, rows_major };

// A tile of scores to mask: query rows [i0, i0 + rows) of query head h
// against keys [j0, j0 + cols). The structural masks also cover `lanes`
// >= rows rows (register padding past the last query), as the prefill's
// lanes must not keep a stale score; the general mask has only `rows`.
struct ScoreTile {
  int64_t h, i0, rows, lanes;
  int64_t j0, cols;
};

// The masks of one batch item b.
template <typename T>
class ScoreMask {
 public:
  ScoreMask(const AttentionParams& p, int64_t b) : p_(p), b_(b), bounds_(p, b) {}

  const KeyBounds& bounds() const { return bounds_; }
  // Keys batch item b has (its key length, or Lk).
  int64_t keys() const { return bounds_.lk; }

  // visible[c] = whether the key padding keeps key j0 + c, for c < cols;
  // returns how many it keeps (0: the whole block is hidden).
  int64_t mark_keys(int64_t j0, int64_t cols, uint8_t* visible) const {
    if (!p_.key_padding) {
      std::memset(visible, 1, cols);
      return cols;
    }
    const uint8_t* kpm = p_.key_padding + b_ * p_.key_padding_stride_b;
    int64_t n = 0;
    for (int64_t c = 0; c < cols; ++c) {
      visible[c] = kpm[(j0 + c) * p_.key_padding_stride_k] != 0;
      n += visible[c];
    }
    return n;
  }

  // Whether every query of rows [first, last] sees every key of
  // [j0, j0 + cols) as far as the bounds go.
  bool inside_bounds(int64_t first, int64_t last, int64_t j0, int64_t cols) const {
    return bounds_.lo(last) <= j0 && bounds_.hi(first) >= j0 + cols - 1;
  }

  // Whether apply() could change a score of a block (false: skip it).
  bool hides_any(bool inside) const {
    return !inside || p_.key_padding || p_.mask_kind != MaskKind::none;
  }

  // Calls fn(j0, cols, inside) for each block of `bc` keys that the rows
  // [first, last] can see, in increasing order; blocks outside the bounds
  // and blocks the padding hides entirely are skipped. Blocks start at
  // multiples of bc whatever the rows, so a row meets the same blocks alone
  // or in a larger batch. A block is trimmed to the keys some row can see:
  // on the right anywhere, on the left by an even count. Neither changes a
  // bit: the trimmed keys would have had probability exactly 0, and the
  // softmax sums a block in an order anchored at the block's first key (see
  // BlockSum), with trimmed keys counting as zeros.
  template <typename Fn>
  void for_each_key_block(int64_t bc, int64_t first, int64_t last, uint8_t* visible,
                          Fn&& fn) const {
    const int64_t span_lo = std::max<int64_t>(bounds_.lo(first), 0);
    const int64_t span_hi = std::min<int64_t>(bounds_.hi(last), bounds_.lk - 1);
    if (span_lo > span_hi) return;
    for (int64_t block = span_lo / bc * bc; block <= span_hi; block += bc) {
      const int64_t j0 = block + std::max<int64_t>(span_lo - block, 0) / 2 * 2;
      const int64_t cols = std::min(block + bc, span_hi + 1) - j0;
      if (mark_keys(j0, cols, visible) == 0) continue;
      fn(j0, cols, inside_bounds(first, last, j0, cols));
    }
  }

  // Hides the scores of the tile that a mask hides (-inf) and adds an
  // additive mask. visible: mark_keys() of the tile's keys. inside: the
  // tile lies within the bounds (inside_bounds), so they hide nothing.
  template <ScoreLayout L>
  void apply(T* s, int64_t ld, const ScoreTile& t, const uint8_t* visible, bool inside) const {
    const auto at = [&](int64_t i, int64_t jj) -> T& {
      return L == ScoreLayout::keys_major ? s[jj * ld + i] : s[i * ld + jj];
    };
    const T ninf = -std::numeric_limits<T>::infinity();
    if (p_.mask_kind != MaskKind::none) {
      const Strides4& ms = p_.mask_stride;
      const int64_t base = b_ * ms.b + t.h * ms.h + t.j0 * ms.c;
      for (int64_t i = 0; i < t.rows; ++i) {
        const int64_t off = base + (t.i0 + i) * ms.r;
        if (p_.mask_kind == MaskKind::additive) {
          const T* m = static_cast<const T*>(p_.mask) + off;
          for (int64_t jj = 0; jj < t.cols; ++jj) at(i, jj) = add_mask(at(i, jj), m[jj * ms.c]);
        } else {
          const uint8_t* m = static_cast<const uint8_t*>(p_.mask) + off;
          for (int64_t jj = 0; jj < t.cols; ++jj)
            if (!m[jj * ms.c]) at(i, jj) = ninf;
        }
      }
    }
    if constexpr (L == ScoreLayout::keys_major) {
      // Key by key: a hidden key's lanes, or the queries its bounds exclude.
      for (int64_t jj = 0; jj < t.cols; ++jj) {
        T* lanes = s + jj * ld;
        if (p_.key_padding && !visible[jj]) {
          std::fill(lanes, lanes + t.lanes, ninf);
        } else if (!inside) {
          const int64_t j = t.j0 + jj;
          const int64_t lo = std::clamp<int64_t>(bounds_.first_query(j) - t.i0, 0, t.lanes);
          const int64_t hi = std::clamp<int64_t>(bounds_.last_query(j) - t.i0 + 1, lo, t.lanes);
          std::fill(lanes, lanes + lo, ninf);
          std::fill(lanes + hi, lanes + t.lanes, ninf);
        }
      }
    } else {
      // Row by row: the keys outside the row's bounds, then hidden keys.
      for (int64_t i = 0; i < t.lanes; ++i) {
        T* row = s + i * ld;
        int64_t lo = 0, hi = t.cols;
        if (!inside) {
          lo = std::clamp<int64_t>(bounds_.lo(t.i0 + i) - t.j0, 0, t.cols);
          hi = std::clamp<int64_t>(bounds_.hi(t.i0 + i) - t.j0 + 1, lo, t.cols);
          std::fill(row, row + lo, ninf);
          std::fill(row + hi, row + t.cols, ninf);
        }
        if (p_.key_padding)
          for (int64_t jj = lo; jj < hi; ++jj)
            if (!visible[jj]) row[jj] = ninf;
      }
    }
  }

 private:
  const AttentionParams& p_;
  int64_t b_;
  KeyBounds bounds_;
};
