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

template <typename T>
struct LinearPlan {
  static constexpr int W = Simd<T>::W, MR = Simd<T>::MR, NR = Simd<T>::NV * Simd<T>::W;
  const LinearParams& lp;
  int64_t panels, row_blocks, groups;
  T* packed;  // panel p: K rows of width(p), at panel(p)

  explicit LinearPlan(const LinearParams& lp_) : lp(lp_) {
    panels = (lp.N + NR - 1) / NR;
    row_blocks = (lp.M + kLinearRowBlock - 1) / kLinearRowBlock;
    groups = (panels + kLinearPanelGroup - 1) / kLinearPanelGroup;
  }
  // Columns of panel p in the output, and as packed (a whole number of
  // registers: the columns past N are zeros).
  int64_t width(int64_t p) const { return std::min<int64_t>(NR, lp.N - p * NR); }
  int64_t stored(int64_t p) const { return (width(p) + W - 1) / W * W; }
  T* panel(int64_t p) const { return packed + p * NR * lp.K; }
  // Elements of the packed weight (every panel slot NR * K).
  static int64_t packed_size(int64_t N, int64_t K) { return (N + NR - 1) / NR * NR * K; }

  // Panel p of w^T: packed[p][k][c] = w[p * NR + c][k], by W x W register
  // transposes, the last K % W columns one by one; rows past N are zeros.
  void pack(int64_t p, T* tile) const {
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

  // MR rows at a (stride lda) times one panel's K slice b (kd rows of nw)
  // into c (stride ldc), in strips of 3, 2 or 1 registers (the backward's
  // micro-kernel, kernel_gemm.h; packing x as well, k-major, measured 10%
  // slower).
  // With bias (the panel's nw values), the last slice adds it to the sums.
  static void rows_times_slice(const T* a, int64_t lda, const T* b, int64_t nw, int64_t kd,
                               T* c, int64_t ldc, bool accumulate, const T* bias) {
    int64_t j = 0;
    const auto at = [bias](int64_t col) { return bias ? bias + col : nullptr; };
    for (; j + 3 * W <= nw; j += 3 * W)
      gemm_micro<T, 3>(a, lda, 1, b + j, nw, kd, c + j, ldc, accumulate, at(j));
    for (; j + 2 * W <= nw; j += 2 * W)
      gemm_micro<T, 2>(a, lda, 1, b + j, nw, kd, c + j, ldc, accumulate, at(j));
    for (; j < nw; j += W)
      gemm_micro<T, 1>(a, lda, 1, b + j, nw, kd, c + j, ldc, accumulate, at(j));
  }

  // R (<= MR) rows held k-major (a[k * R + r]) times a panel's K slice:
  // the same strips, R accumulator rows, the panel prefetched ahead, and
  // `per_step` lines a step of the region at `stream` prefetched too.
  template <int R>
  static void few_rows_times_slice(const T* a, const T* b, int64_t nw, int64_t kd,
                                   T* c, int64_t ldc, bool accumulate, const T* bias,
                                   const char* stream, int64_t per_step) {
    int64_t j = 0;
    const auto at = [bias](int64_t col) { return bias ? bias + col : nullptr; };
    for (; j + 3 * W <= nw; j += 3 * W, per_step = 0)
      gemm_micro<T, 3, false, R, kLinearAhead, true>(a, 1, R, b + j, nw, kd, c + j, ldc,
                                                     accumulate, at(j), stream, per_step);
    for (; j + 2 * W <= nw; j += 2 * W, per_step = 0)
      gemm_micro<T, 2, false, R, kLinearAhead, true>(a, 1, R, b + j, nw, kd, c + j, ldc,
                                                     accumulate, at(j), stream, per_step);
    for (; j < nw; j += W, per_step = 0)
      gemm_micro<T, 1, false, R, kLinearAhead, true>(a, 1, R, b + j, nw, kd, c + j, ldc,
                                                     accumulate, at(j), stream, per_step);
  }
  template <int R = MR>
  static void rows_times_slice_n(int rows, const T* a, const T* b, int64_t nw, int64_t kd,
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
  void run_panel(int64_t p, const T* xk, Arena& arena) const {
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
    if (lp.K == 0) {
      for (int64_t m = 0; m < lp.M; ++m)
        for (int64_t n = 0; n < nw; ++n) c[m * ldc + n] = pb ? T(0) + pb[n] : T(0);
    }
    // With more than one strip of rows, the strips after the first fetch
    // the next K slice of the panel into L2 while they compute on this one
    // (from L1), so the first strip of the next slice finds it there: with
    // only the first strip's own prefetch ahead, reading the panel and
    // computing on it alternated (BENCHMARKS.md, "Projections").
    const int64_t strips = (lp.M + MR - 1) / MR;
    for (int64_t k0 = 0; k0 < lp.K; k0 += kLinearKc) {
      const int64_t kd = std::min(kLinearKc, lp.K - k0);
      const T* slice_bias = k0 + kd == lp.K ? pb : nullptr;
      const T* b = panel(p) + k0 * ns;
      // After the last slice: the next panel's first (it follows this one
      // in memory when the panel is full width; a thread's run of panels
      // goes on into it).
      const int64_t next_kd = k0 + kd < lp.K ? std::min(kLinearKc, lp.K - k0 - kd)
                              : ns == NR  ? std::min(kLinearKc, lp.K)
                                          : 0;
      const int64_t next_lines =
          strips > 1 ? (next_kd * ns * static_cast<int64_t>(sizeof(T)) + 63) / 64 : 0;
      const int64_t share = strips > 1 ? (next_lines + strips - 2) / (strips - 1) : 0;
      for (int64_t s = 0, m = 0; m < lp.M; ++s, m += MR) {
        const int rows = static_cast<int>(std::min<int64_t>(MR, lp.M - m));
        const char* stream =
            s > 0 ? reinterpret_cast<const char*>(b + kd * ns) + (s - 1) * share * 64 : nullptr;
        const int64_t per_step = s > 0 && kd > 0 ? (share + kd - 1) / kd : 0;
        rows_times_slice_n(rows, xk + m * lp.K + k0 * rows, b, ns, kd, c + m * ldc, ldc, k0 > 0,
                           slice_bias, stream, per_step);
      }
    }
    if (ns != nw)
      for (int64_t m = 0; m < lp.M; ++m)
        std::copy(c + m * ldc, c + m * ldc + nw, out + m * lp.out_ld + n0);
  }

  // x's rows in strips of MR (the last may be shorter), each strip k-major:
  // strip s at xk + s * MR * K, its element (r, k) at k * rows + r.
  void pack_rows(T* xk) const {
    const T* x = static_cast<const T*>(lp.x);
    for (int64_t m = 0; m < lp.M; m += MR) {
      const int64_t rows = std::min<int64_t>(MR, lp.M - m);
      T* dst = xk + m * lp.K;
      for (int64_t r = 0; r < rows; ++r) {
        const T* src = x + (m + r) * lp.x_ld;
        for (int64_t k = 0; k < lp.K; ++k) dst[k * rows + r] = src[k];
      }
    }
  }

  // One task: rows [m0, m0 + kLinearRowBlock) times the panels of group g,
  // K slice by K slice (the group's panel slices stay in L2 for all the
  // rows). The last rows of the matrix, fewer than MR, go through
  // zero-padded copies; so does a last panel whose width is not a whole
  // number of registers (its sums go to a scratch block, then out).
  void run(int64_t rb, int64_t g, Arena& arena) const {
    const T* x = static_cast<const T*>(lp.x);
    T* out = static_cast<T*>(lp.out);
    const int64_t m0 = rb * kLinearRowBlock, m1 = std::min(lp.M, m0 + kLinearRowBlock);
    const int64_t p0 = g * kLinearPanelGroup, p1 = std::min(panels, p0 + kLinearPanelGroup);
    const int64_t n0 = p0 * NR, n1 = std::min(lp.N, p1 * NR);
    const int64_t tail = (m1 - m0) % MR, whole = m1 - tail;
    // The panel with padded columns, if this group has it.
    const int64_t edge = stored(p1 - 1) != width(p1 - 1) ? p1 - 1 : -1;
    const int64_t edge_cols = edge >= 0 ? stored(edge) : 0;
    const int64_t block_rows = whole - m0 + (tail ? MR : 0);
    arena.reset(sizeof(T) * (MR * (lp.K + n1 - n0) + block_rows * edge_cols + edge_cols) +
                4 * 64);
    T* a_tail = arena.carve<T>(MR * lp.K);
    T* c_tail = arena.carve<T>(MR * (n1 - n0));
    T* c_edge = arena.carve<T>(block_rows * edge_cols);  // (rows of the block, edge_cols)
    T* bias_edge = arena.carve<T>(edge_cols);
    if (tail) {
      std::fill(a_tail, a_tail + MR * lp.K, T(0));
      for (int64_t r = 0; r < tail; ++r)
        std::copy(x + (whole + r) * lp.x_ld, x + (whole + r) * lp.x_ld + lp.K, a_tail + r * lp.K);
    }
    const T* bias = static_cast<const T*>(lp.bias);
    if (edge >= 0 && bias) {
      std::fill(bias_edge, bias_edge + edge_cols, T(0));
      std::copy(bias + edge * NR, bias + lp.N, bias_edge);
    }
    for (int64_t k0 = 0; k0 < lp.K; k0 += kLinearKc) {
      const int64_t kd = std::min(kLinearKc, lp.K - k0);
      const bool last = k0 + kd == lp.K;
      // MR rows against each panel of the group in turn: the rows' slice
      // (MR x kd, 6 KiB) stays in L1 and is broadcast from there, while
      // the panels' slices stream from L2 as whole sequential lines.
      // Panel-major instead (a 36 KiB panel slice held in L1 while 8-row
      // groups of x stream past) left too little of L1 for the strided
      // rows of x: 1-10% slower at (1024, 768, 2304) in five paired runs.
      // edge_rows: this strip's rows of c_edge.
      const auto rows_times_group = [&](const T* a, int64_t lda, T* c, int64_t ldc,
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
        rows_times_group(x + m * lp.x_ld, lp.x_ld, out + m * lp.out_ld + n0, lp.out_ld,
                         c_edge + (m - m0) * edge_cols);
      if (tail)
        rows_times_group(a_tail, lp.K, c_tail, n1 - n0, c_edge + (whole - m0) * edge_cols);
    }
    if (edge >= 0 && lp.K > 0) {
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
    if (lp.K == 0)  // no slice ran: out = 0 + b
      for (int64_t m = m0; m < m1; ++m) {
        T* row = out + m * lp.out_ld;
        for (int64_t n = n0; n < n1; ++n) row[n] = bias ? T(0) + bias[n] : T(0);
      }
  }
};

// out = x w^T (+ bias), w packed here unless lp.packed holds it already.
template <typename T>
void linear_typed(const LinearParams& lp) {
  LinearPlan<T> plan(lp);
  T* packed = nullptr;
  struct Free { T* p; ~Free() { std::free(p); } } free_packed{nullptr};
  if (lp.packed) {
    plan.packed = const_cast<T*>(static_cast<const T*>(lp.packed));
  } else {
    const size_t bytes = PrefillTiling<T>::round_up(
        std::max<int64_t>(LinearPlan<T>::packed_size(lp.N, lp.K), 1) * sizeof(T), 64);
    packed = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!packed) throw std::bad_alloc();
    free_packed.p = packed;
    plan.packed = packed;
    parallel_for(plan.panels, [&](int64_t p, int) {
      alignas(64) T tile[LinearPlan<T>::W * LinearPlan<T>::W];
      plan.pack(p, tile);
    });
  }
  if (lp.M <= kLinearSkinnyRows) {
    std::vector<T> xk(static_cast<size_t>(lp.M * lp.K));
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
  if (lp.dtype == DType::f64)
    linear_typed<double>(lp);
  else
    linear_typed<float>(lp);
}

// Elements of w (N x K) packed for this path.
int64_t linear_packed_size(DType dtype, int64_t N, int64_t K) {
  return dtype == DType::f64 ? LinearPlan<double>::packed_size(N, K)
                             : LinearPlan<float>::packed_size(N, K);
}

// Packs lp.w (N x K) into dst (linear_packed_size elements, 64-byte
// aligned), on the pool.
template <typename T>
void linear_pack_typed(const LinearParams& lp, void* dst) {
  LinearPlan<T> plan(lp);
  plan.packed = static_cast<T*>(dst);
  parallel_for(plan.panels, [&](int64_t p, int) {
    alignas(64) T tile[LinearPlan<T>::W * LinearPlan<T>::W];
    plan.pack(p, tile);
  });
}

void linear_pack(const LinearParams& lp, void* dst) {
  if (lp.N == 0 || lp.K == 0) return;
  if (lp.dtype == DType::f64)
    linear_pack_typed<double>(lp, dst);
  else
    linear_pack_typed<float>(lp, dst);
}
