// The projections of the modules: out = x w^T (+ bias), as one GEMM on
// tileattn's own pool. A fragment included inside tileattn::<isa> (see
// kernel_common.h).
//
// Why not NumPy's BLAS: after a call OpenBLAS keeps its threads spinning for
// ~0.1 s, and the attention core that follows a projection then shares the
// two cores with them (measured: the core 1.5x slower right after a GEMM).
// On one pool the projections and the core hand the cores to each other.
//
// The method: w is packed (once per call, or once for good by linear_pack)
// into panels of NV * W columns (k-major, so a panel row is NV registers;
// the last panel's columns rounded up to a whole register with zeros); a task takes a block of rows
// of x and a group of panels, and walks K in slices of kLinearKc; in a
// slice, MR rows of x at a time meet every panel of the group. Every
// output element is one fused multiply-add chain per K slice, the slices
// added in order: the same bits for any thread count and any position of
// a row in the batch.

// Measured (paired, 2 threads, (1024, 768, 2304)): K slices of 128 or 256
// and row blocks of 48 or 192 were 1-5% slower than these.
constexpr int64_t kLinearKc = 192;        // K slice: a 48-wide float panel slice is 36 KiB
constexpr int64_t kLinearRowBlock = 96;   // rows of x per task (a multiple of every MR)
constexpr int64_t kLinearPanelGroup = 8;  // panels per task
// Products of at most this many rows take the skinny path (run_panel).
// Measured (six Linear(4096, 4096), 2 threads, Sapphire Rapids): the
// skinny path is faster than the blocked one up to M = 32 (M = 32: 34 ms
// against 42 ms blocked).
constexpr int64_t kLinearSkinnyRows = 32;
// The skinny path prefetches each panel this many K rows ahead into L2:
// without it, reading w and computing on it did not overlap (M = 8: 24.6 ms
// for the six layers, 16.6-17.5 ms with it; 16 to 128 rows ahead alike,
// into L1 slower, non-temporal 2x slower).
constexpr int kLinearAhead = 16;
// Runs of consecutive panels per thread on the skinny path.
constexpr int64_t kLinearRunsPerThread = 2;

// T: the dtype of x, the bias and out. E: the element of the products'
// operands as the micro-kernels read them, T itself, or Bf16Pair (two
// bf16 values along K; kernel_bf16.h) with float32 sums. Along K the plan
// counts elements of E: K pairs of bf16 are 2K values of the caller's.
template <typename T, typename E = T>
struct LinearPlan {
  static constexpr int W = Simd<T>::W, MR = Simd<T>::MR, NR = Simd<T>::NV * Simd<T>::W;
  static constexpr bool kPairs = std::is_same_v<E, Bf16Pair>;
  static_assert(!kPairs || std::is_same_v<T, float>, "bf16 products sum in float32");
  const LinearParams& lp;
  int64_t panels, row_blocks, groups;
  int64_t K;          // along K, in elements of E
  const E* x;         // x as the products read it (for pairs: rounded by the caller)
  int64_t x_ld;
  E* packed;  // panel p: K rows of width(p), at panel(p)

  explicit LinearPlan(const LinearParams& lp_) : lp(lp_) {
    K = kPairs ? (lp.K + 1) / 2 : lp.K;
    x = kPairs ? nullptr : static_cast<const E*>(lp.x);
    x_ld = kPairs ? K : lp.x_ld;
    panels = (lp.N + NR - 1) / NR;
    row_blocks = (lp.M + kLinearRowBlock - 1) / kLinearRowBlock;
    groups = (panels + kLinearPanelGroup - 1) / kLinearPanelGroup;
  }
  // Columns of panel p in the output, and as packed (a whole number of
  // registers: the columns past N are zeros).
  int64_t width(int64_t p) const { return std::min<int64_t>(NR, lp.N - p * NR); }
  int64_t stored(int64_t p) const { return (width(p) + W - 1) / W * W; }
  E* panel(int64_t p) const { return packed + p * NR * K; }
  // Bytes of the packed weight (every panel slot NR * K elements).
  static int64_t packed_bytes(int64_t N, int64_t k_values) {
    const int64_t k = kPairs ? (k_values + 1) / 2 : k_values;
    return (N + NR - 1) / NR * NR * k * static_cast<int64_t>(sizeof(E));
  }

  // Panel p of w^T in pairs: packed[p][k][c] = (w[n][2k], w[n][2k + 1]),
  // n = p * NR + c, rounded to bf16 unless w holds bf16 already; columns
  // past N are zeros, and so is an odd K's last high half.
  void pack_pairs(int64_t p) const {
    const int64_t n0 = p * NR, nw = width(p), ns = stored(p);
    E* dst = panel(p);
    // W columns at a time: W source rows read side by side, each output
    // row of the group one contiguous run of W pairs.
    alignas(64) Bf16Pair col[64];
    for (int64_t c0 = 0; c0 < ns; c0 += W) {
      for (int64_t c = c0; c < c0 + W; ++c) {
        if (c >= nw) {
          for (int64_t k = 0; k < K; ++k) dst[k * ns + c] = Bf16Pair{};
          continue;
        }
        for (int64_t k0 = 0; k0 < K; k0 += 64) {
          const int64_t kn = std::min<int64_t>(64, K - k0), v0 = 2 * k0;
          const int64_t vn = std::min<int64_t>(2 * kn, lp.K - v0);
          if (lp.w_bf16)
            bf16_pairs_from(static_cast<const uint16_t*>(lp.w) + (n0 + c) * lp.w_ld + v0, vn, col);
          else
            bf16_pairs_from(static_cast<const float*>(lp.w) + (n0 + c) * lp.w_ld + v0, vn, col);
          for (int64_t k = 0; k < kn; ++k) dst[(k0 + k) * ns + c] = col[k];
        }
      }
    }
  }

  // Panel p of w^T: packed[p][k][c] = w[p * NR + c][k], by W x W register
  // transposes, the last K % W columns one by one; rows past N are zeros.
  void pack(int64_t p, T* tile) const {
    if constexpr (kPairs) {
      pack_pairs(p);
      return;
    } else {
      pack_values(p, tile);
    }
  }
  void pack_values(int64_t p, T* tile) const {
    const T* w = static_cast<const T*>(lp.w);
    const int64_t n0 = p * NR, nw = width(p), ns = stored(p), kw = lp.K / W * W;
    T* dst = panel(p);
    alignas(64) T rows_pad[W * W];
    for (int64_t c0 = 0; c0 < ns; c0 += W) {
      const int64_t have = std::min<int64_t>(W, nw - c0);  // real rows of this group
      const T* rows = w + (n0 + c0) * lp.w_ld;
      for (int64_t k0 = 0; k0 < kw; k0 += W) {
        const T* src = rows + k0;
        int64_t ld = lp.w_ld;
        if (have < W) {  // the last rows of w: a zero-padded copy
          std::fill(rows_pad, rows_pad + W * W, T(0));
          for (int64_t i = 0; i < have; ++i)
            std::copy(src + i * lp.w_ld, src + i * lp.w_ld + W, rows_pad + i * W);
          src = rows_pad;
          ld = W;
        }
        Simd<T>::transpose_tile(src, ld, tile);
        // One vector store per row: std::copy here became a `rep movsq`
        // per 64 bytes, 43% of the packing's time.
        for (int i = 0; i < W; ++i)
          Simd<T>::storeu(dst + (k0 + i) * ns + c0, Simd<T>::load(tile + i * W));
      }
      for (int64_t c = 0; c < W; ++c)
        for (int64_t k = kw; k < lp.K; ++k)
          dst[k * ns + c0 + c] = c < have ? rows[c * lp.w_ld + k] : T(0);
    }
  }

  // The inverse of pack: panel p's rows within [r0, r1) back into `dst`
  // (rows r0 .. r1 - 1 of w, row-major, ld lp.K), bf16 pairs widened to
  // float32 (exactly). K outer: each step writes one value into each of
  // the rows, reading one contiguous row of the panel.
  void unpack(int64_t p, int64_t r0, int64_t r1, T* dst) const {
    const int64_t n0 = p * NR, ns = stored(p);
    const int64_t c0 = std::max<int64_t>(0, r0 - n0), c1 = std::min(width(p), r1 - n0);
    const E* src = panel(p);
    for (int64_t k = 0; k < K; ++k) {
      const E* from = src + k * ns;
      for (int64_t c = c0; c < c1; ++c) {
        T* row = dst + (n0 + c - r0) * lp.K;
        if constexpr (kPairs) {
          const uint32_t u = static_cast<uint32_t>(from[c]);
          row[2 * k] = bf16_widen(static_cast<uint16_t>(u));
          if (2 * k + 1 < lp.K) row[2 * k + 1] = bf16_widen(static_cast<uint16_t>(u >> 16));
        } else {
          row[k] = from[c];
        }
      }
    }
  }

  // The micro-kernel of E (kernel_gemm.h) with E's operand policy.
  using Steps = std::conditional_t<kPairs, PairSteps, ElementSteps<T>>;
  template <int NV, int R = MR, int kAhead = 0, bool kStream = false>
  static void micro(const E* a, int64_t a_rs, int64_t a_cs, const E* b, int64_t ldb, int64_t kd,
                    T* c, int64_t ldc, bool accumulate, const T* then_add,
                    const char* stream = nullptr, int64_t per_step = 0) {
    gemm_micro<Steps, NV, false, R, kAhead, kStream>(a, a_rs, a_cs, b, ldb, kd, c, ldc,
                                                     accumulate, then_add, stream, per_step);
  }

  // MR rows at a (stride lda) times one panel's K slice b (kd rows of nw)
  // into c (stride ldc), in strips of 3, 2 or 1 registers (the backward's
  // micro-kernel, kernel_gemm.h; packing x as well, k-major, measured 10%
  // slower).
  // With bias (the panel's nw values), the last slice adds it to the sums.
  static void rows_times_slice(const E* a, int64_t lda, const E* b, int64_t nw, int64_t kd,
                               T* c, int64_t ldc, bool accumulate, const T* bias) {
    int64_t j = 0;
    const auto at = [bias](int64_t col) { return bias ? bias + col : nullptr; };
    for (; j + 3 * W <= nw; j += 3 * W)
      micro<3>(a, lda, 1, b + j, nw, kd, c + j, ldc, accumulate, at(j));
    for (; j + 2 * W <= nw; j += 2 * W)
      micro<2>(a, lda, 1, b + j, nw, kd, c + j, ldc, accumulate, at(j));
    for (; j < nw; j += W)
      micro<1>(a, lda, 1, b + j, nw, kd, c + j, ldc, accumulate, at(j));
  }

  // R (<= MR) rows held k-major (a[k * R + r]) times a panel's K slice:
  // the same strips, R accumulator rows, the panel prefetched ahead, and
  // `per_step` lines a step of the region at `stream` prefetched too.
  template <int R>
  static void few_rows_times_slice(const E* a, const E* b, int64_t nw, int64_t kd,
                                   T* c, int64_t ldc, bool accumulate, const T* bias,
                                   const char* stream, int64_t per_step) {
    int64_t j = 0;
    const auto at = [bias](int64_t col) { return bias ? bias + col : nullptr; };
    for (; j + 3 * W <= nw; j += 3 * W, per_step = 0)
      micro<3, R, kLinearAhead, true>(a, 1, R, b + j, nw, kd, c + j, ldc,
                                                     accumulate, at(j), stream, per_step);
    for (; j + 2 * W <= nw; j += 2 * W, per_step = 0)
      micro<2, R, kLinearAhead, true>(a, 1, R, b + j, nw, kd, c + j, ldc,
                                                     accumulate, at(j), stream, per_step);
    for (; j < nw; j += W, per_step = 0)
      micro<1, R, kLinearAhead, true>(a, 1, R, b + j, nw, kd, c + j, ldc,
                                                     accumulate, at(j), stream, per_step);
  }
  template <int R = MR>
  static void rows_times_slice_n(int rows, const E* a, const E* b, int64_t nw, int64_t kd,
                                 T* c, int64_t ldc, bool accumulate, const T* bias,
                                 const char* stream, int64_t per_step) {
    if constexpr (R >= 1) {
      if (rows == R)
        return few_rows_times_slice<R>(a, b, nw, kd, c, ldc, accumulate, bias, stream, per_step);
      rows_times_slice_n<R - 1>(rows, a, b, nw, kd, c, ldc, accumulate, bias, stream, per_step);
    }
  }

  // The skinny path (a decode step: M <= kLinearSkinnyRows): one task is
  // every row of x times panel p, the whole of K. Panel by panel, each
  // thread streams whole panels (K * NR contiguous values) from memory once,
  // with no zero-padded rows of x: the product is bound by reading w.
  // xk holds x in strips of MR rows, each k-major (pack_rows): the rows'
  // values at one k are one cache line, not MR lines a row stride apart
  // (with a 4096-wide x, all in one L1 set).
  // Each element is summed exactly as in run() (the same K slices, each a
  // chain from zero added to the previous), so a row has the same bits on
  // both paths.
  void run_panel(int64_t p, const E* xk, Arena& arena) const {
    T* out = static_cast<T*>(lp.out);
    const T* bias = static_cast<const T*>(lp.bias);
    const int64_t n0 = p * NR, nw = width(p), ns = stored(p);
    T* c = out + n0;
    int64_t ldc = lp.out_ld;
    const T* pb = bias ? bias + n0 : nullptr;
    if (ns != nw) {  // a panel with padded columns: sums to a scratch block, then out
      arena.reset(sizeof(T) * (lp.M * ns + ns) + 2 * 64);
      c = arena.carve<T>(lp.M * ns);
      ldc = ns;
      if (bias) {
        T* b = arena.carve<T>(ns);
        std::fill(b, b + ns, T(0));
        std::copy(bias + n0, bias + lp.N, b);
        pb = b;
      }
    }
    if (K == 0) {
      for (int64_t m = 0; m < lp.M; ++m)
        for (int64_t n = 0; n < nw; ++n) c[m * ldc + n] = pb ? T(0) + pb[n] : T(0);
    }
    // With more than one strip of rows, the strips after the first fetch
    // the next K slice of the panel into L2 while they compute on this one
    // (from L1), so the first strip of the next slice finds it there: with
    // only the first strip's own prefetch ahead, reading the panel and
    // computing on it alternated (BENCHMARKS.md, "Projections").
    const int64_t strips = (lp.M + MR - 1) / MR;
    for (int64_t k0 = 0; k0 < K; k0 += kLinearKc) {
      const int64_t kd = std::min(kLinearKc, K - k0);
      const T* slice_bias = k0 + kd == K ? pb : nullptr;
      const E* b = panel(p) + k0 * ns;
      // After the last slice: the next panel's first (it follows this one
      // in memory when the panel is full width; a thread's run of panels
      // goes on into it).
      const int64_t next_kd = k0 + kd < K ? std::min(kLinearKc, K - k0 - kd)
                              : ns == NR  ? std::min(kLinearKc, K)
                                          : 0;
      const int64_t next_lines =
          strips > 1 ? (next_kd * ns * static_cast<int64_t>(sizeof(E)) + 63) / 64 : 0;
      const int64_t share = strips > 1 ? (next_lines + strips - 2) / (strips - 1) : 0;
      for (int64_t s = 0, m = 0; m < lp.M; ++s, m += MR) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, lp.M - m));
        const char* stream =
            s > 0 ? reinterpret_cast<const char*>(b + kd * ns) + (s - 1) * share * 64 : nullptr;
        const int64_t per_step = s > 0 && kd > 0 ? (share + kd - 1) / kd : 0;
        rows_times_slice_n(rows, xk + m * K + k0 * rows, b, ns, kd, c + m * ldc, ldc, k0 > 0,
                           slice_bias, stream, per_step);
      }
    }
    if (ns != nw)
      for (int64_t m = 0; m < lp.M; ++m)
        std::copy(c + m * ldc, c + m * ldc + nw, out + m * lp.out_ld + n0);
  }

  // x's rows in strips of MR (the last may be shorter), each strip k-major:
  // strip s at xk + s * MR * K, its element (r, k) at k * rows + r.
  void pack_rows(E* xk) const {
    for (int64_t m = 0; m < lp.M; m += MR) {
      const int64_t rows = std::min<int64_t>(MR, lp.M - m);
      E* dst = xk + m * K;
      for (int64_t r = 0; r < rows; ++r) {
        const E* src = x + (m + r) * x_ld;
        for (int64_t k = 0; k < K; ++k) dst[k * rows + r] = src[k];
      }
    }
  }

  // One task: rows [m0, m0 + kLinearRowBlock) times the panels of group g,
  // K slice by K slice (the group's panel slices stay in L2 for all the
  // rows). The last rows of the matrix, fewer than MR, go through
  // zero-padded copies; so does a last panel whose width is not a whole
  // number of registers (its sums go to a scratch block, then out).
  void run(int64_t rb, int64_t g, Arena& arena) const {
    T* out = static_cast<T*>(lp.out);
    const int64_t m0 = rb * kLinearRowBlock, m1 = std::min(lp.M, m0 + kLinearRowBlock);
    const int64_t p0 = g * kLinearPanelGroup, p1 = std::min(panels, p0 + kLinearPanelGroup);
    const int64_t n0 = p0 * NR, n1 = std::min(lp.N, p1 * NR);
    const int64_t tail = (m1 - m0) % MR, whole = m1 - tail;
    // The panel with padded columns, if this group has it.
    const int64_t edge = stored(p1 - 1) != width(p1 - 1) ? p1 - 1 : -1;
    const int64_t edge_cols = edge >= 0 ? stored(edge) : 0;
    const int64_t block_rows = whole - m0 + (tail ? MR : 0);
    arena.reset(sizeof(E) * MR * K + sizeof(T) * (MR * (n1 - n0) + block_rows * edge_cols +
                edge_cols) + 4 * 64);
    E* a_tail = arena.carve<E>(MR * K);
    T* c_tail = arena.carve<T>(MR * (n1 - n0));
    T* c_edge = arena.carve<T>(block_rows * edge_cols);  // (rows of the block, edge_cols)
    T* bias_edge = arena.carve<T>(edge_cols);
    if (tail) {
      std::fill(a_tail, a_tail + MR * K, E{});
      for (int64_t r = 0; r < tail; ++r)
        std::copy(x + (whole + r) * x_ld, x + (whole + r) * x_ld + K, a_tail + r * K);
    }
    const T* bias = static_cast<const T*>(lp.bias);
    if (edge >= 0 && bias) {
      std::fill(bias_edge, bias_edge + edge_cols, T(0));
      std::copy(bias + edge * NR, bias + lp.N, bias_edge);
    }
    for (int64_t k0 = 0; k0 < K; k0 += kLinearKc) {
      const int64_t kd = std::min(kLinearKc, K - k0);
      const bool last = k0 + kd == K;
      // MR rows against each panel of the group in turn: the rows' slice
      // (MR x kd, 6 KiB) stays in L1 and is broadcast from there, while
      // the panels' slices stream from L2 as whole sequential lines.
      // Panel-major instead (a 36 KiB panel slice held in L1 while 8-row
      // groups of x stream past) left too little of L1 for the strided
      // rows of x: 1-10% slower at (1024, 768, 2304) in five paired runs.
      // edge_rows: this strip's rows of c_edge.
      const auto rows_times_group = [&](const E* a, int64_t lda, T* c, int64_t ldc,
                                        T* edge_rows) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t ns = stored(p);
          const bool at_edge = p == edge;
          // The bias is added after the sum: (x w^T) + b.
          const T* pb = last && bias ? (at_edge ? bias_edge : bias + p * NR) : nullptr;
          rows_times_slice(a + k0, lda, panel(p) + k0 * ns, ns, kd,
                           at_edge ? edge_rows : c + (p - p0) * NR, at_edge ? ns : ldc, k0 > 0,
                           pb);
        }
      };
      for (int64_t m = m0; m < whole; m += MR)
        rows_times_group(x + m * x_ld, x_ld, out + m * lp.out_ld + n0, lp.out_ld,
                         c_edge + (m - m0) * edge_cols);
      if (tail)
        rows_times_group(a_tail, K, c_tail, n1 - n0, c_edge + (whole - m0) * edge_cols);
    }
    if (edge >= 0 && K > 0) {
      const int64_t e0 = edge * NR, en = lp.N - e0;
      for (int64_t m = m0; m < m1; ++m) {
        const T* src = c_edge + (m - m0) * edge_cols;
        if (m >= whole)
          std::copy(src, src + en, c_tail + (m - whole) * (n1 - n0) + (e0 - n0));
        else
          std::copy(src, src + en, out + m * lp.out_ld + e0);
      }
    }
    for (int64_t r = 0; r < tail; ++r)
      std::copy(c_tail + r * (n1 - n0), c_tail + (r + 1) * (n1 - n0),
                out + (whole + r) * lp.out_ld + n0);
    if (K == 0)  // no slice ran: out = 0 + b
      for (int64_t m = m0; m < m1; ++m) {
        T* row = out + m * lp.out_ld;
        for (int64_t n = n0; n < n1; ++n) row[n] = bias ? T(0) + bias[n] : T(0);
      }
  }
};

// Packs lp.w into plan.packed, panels spread over the pool.
template <typename T, typename E>
void pack_all(const LinearPlan<T, E>& plan) {
  parallel_for(plan.panels, [&](int64_t p, int) {
    alignas(64) T tile[LinearPlan<T, E>::W * LinearPlan<T, E>::W];
    plan.pack(p, tile);
  });
}

// out = x w^T (+ bias), w packed here unless lp.packed holds it already.
// With bf16 products, x's rows are first rounded into pairs (one pass over
// x, which the product reads N / NR times).
template <typename T, typename E = T>
void linear_typed(const LinearParams& lp) {
  using Plan = LinearPlan<T, E>;
  Plan plan(lp);
  struct Free { void* p; ~Free() { std::free(p); } } free_packed{nullptr};
  if (lp.packed) {
    plan.packed = const_cast<E*>(static_cast<const E*>(lp.packed));
  } else {
    const size_t bytes = PrefillTiling<T>::round_up(
        std::max<int64_t>(Plan::packed_bytes(lp.N, lp.K), 1), 64);
    E* packed = static_cast<E*>(std::aligned_alloc(64, bytes));
    if (!packed) throw std::bad_alloc();
    free_packed.p = packed;
    plan.packed = packed;
    pack_all(plan);
  }
  std::vector<E> x_pairs;
  if constexpr (Plan::kPairs) {
    x_pairs.resize(static_cast<size_t>(lp.M * plan.K));
    const float* x = static_cast<const float*>(lp.x);
    constexpr int64_t kRowsPerTask = 16;
    parallel_for((lp.M + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t t, int) {
      for (int64_t m = t * kRowsPerTask; m < std::min(lp.M, (t + 1) * kRowsPerTask); ++m)
        bf16_pairs_from(x + m * lp.x_ld, lp.K, x_pairs.data() + m * plan.K);
    });
    plan.x = x_pairs.data();
  }
  if (lp.M <= kLinearSkinnyRows) {
    std::vector<E> xk(static_cast<size_t>(lp.M * plan.K));
    plan.pack_rows(xk.data());
    // Runs of consecutive panels, a few per thread: the packed panels lie
    // one after the other, so a run is one unbroken stream from memory and
    // the prefetch ahead carries over from a panel into the next.
    const int64_t runs = std::min<int64_t>(plan.panels, kLinearRunsPerThread * num_threads());
    parallel_for(runs, [&](int64_t r, int) {
      static thread_local Arena arena;
      const int64_t p1 = (r + 1) * plan.panels / runs;
      for (int64_t p = r * plan.panels / runs; p < p1; ++p) plan.run_panel(p, xk.data(), arena);
    });
    return;
  }
  // Tasks group by group (all row blocks of one panel group, then the
  // next): a thread's next task then finds the group's packed panels in
  // its L2 (1.2 MiB at K = 768) instead of another group's in L3. Paired:
  // 4-6% faster at N = 2304 and 3072 than row block by row block.
  parallel_for(plan.row_blocks * plan.groups, [&](int64_t task, int) {
    static thread_local Arena arena;
    plan.run(task % plan.row_blocks, task / plan.row_blocks, arena);
  });
}

void linear_forward(const LinearParams& lp) {
  if (lp.M == 0 || lp.N == 0) return;
  if (lp.products == Products::bf16)
    linear_typed<float, Bf16Pair>(lp);
  else if (lp.dtype == DType::f64)
    linear_typed<double>(lp);
  else
    linear_typed<float>(lp);
}

// Bytes of w (N x K) packed for this path.
int64_t linear_packed_bytes(const LinearParams& lp) {
  if (lp.products == Products::bf16) return LinearPlan<float, Bf16Pair>::packed_bytes(lp.N, lp.K);
  return lp.dtype == DType::f64 ? LinearPlan<double>::packed_bytes(lp.N, lp.K)
                                : LinearPlan<float>::packed_bytes(lp.N, lp.K);
}

// Packs lp.w (N x K) into dst (linear_packed_bytes, 64-byte aligned), on
// the pool.
template <typename T, typename E = T>
void linear_pack_typed(const LinearParams& lp, void* dst) {
  LinearPlan<T, E> plan(lp);
  plan.packed = static_cast<E*>(dst);
  pack_all(plan);
}

// Rows [r0, r1) of lp.packed (made by linear_pack on this path for lp's N,
// K, dtype and products) back into dst, row-major (r1 - r0) x K: float32
// for bf16 products (the bf16 values widened) or lp.dtype; on the pool.
template <typename T, typename E = T>
void linear_unpack_typed(const LinearParams& lp, int64_t r0, int64_t r1, void* dst) {
  using Plan = LinearPlan<T, E>;
  Plan plan(lp);
  plan.packed = const_cast<E*>(static_cast<const E*>(lp.packed));
  const int64_t p0 = r0 / Plan::NR, p1 = (r1 + Plan::NR - 1) / Plan::NR;
  parallel_for(p1 - p0, [&](int64_t i, int) {
    plan.unpack(p0 + i, r0, r1, static_cast<T*>(dst));
  });
}

void linear_unpack(const LinearParams& lp, int64_t r0, int64_t r1, void* dst) {
  if (r1 <= r0 || lp.K == 0) return;
  if (lp.products == Products::bf16)
    linear_unpack_typed<float, Bf16Pair>(lp, r0, r1, dst);
  else if (lp.dtype == DType::f64)
    linear_unpack_typed<double>(lp, r0, r1, dst);
  else
    linear_unpack_typed<float>(lp, r0, r1, dst);
}

void linear_pack(const LinearParams& lp, void* dst) {
  if (lp.N == 0 || lp.K == 0) return;
  if (lp.products == Products::bf16)
    linear_pack_typed<float, Bf16Pair>(lp, dst);
  else if (lp.dtype == DType::f64)
    linear_pack_typed<double>(lp, dst);
  else
    linear_pack_typed<float>(lp, dst);
}
