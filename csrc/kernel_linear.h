// The projections of the modules: out = x w^T (+ bias), as one GEMM on
// tileattn's own pool. A fragment included inside tileattn::<isa> (see
// kernel_common.h).
//
// Why not NumPy's BLAS: after a call OpenBLAS keeps its threads spinning for
// ~0.1 s, and the attention core that follows a projection then shares the
// two cores with them (measured: the core 1.5x slower right after a GEMM).
// On one pool the projections and the core hand the cores to each other.
//
// The method: w is packed once per call into panels of NV * W columns
// (k-major, so a panel row is NV registers); a task takes a block of rows
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
  int64_t width(int64_t p) const { return std::min<int64_t>(NR, lp.N - p * NR); }
  T* panel(int64_t p) const { return packed + p * NR * lp.K; }

  // Panel p of w^T: packed[p][k][c] = w[p * NR + c][k], by W x W register
  // transposes (nw is a multiple of W), the last K % W columns one by one.
  void pack(int64_t p, T* tile) const {
    const T* w = static_cast<const T*>(lp.w);
    const int64_t n0 = p * NR, nw = width(p), kw = lp.K / W * W;
    T* dst = panel(p);
    for (int64_t c0 = 0; c0 < nw; c0 += W) {
      const T* rows = w + (n0 + c0) * lp.w_ld;
      for (int64_t k0 = 0; k0 < kw; k0 += W) {
        Simd<T>::transpose_tile(rows + k0, lp.w_ld, tile);
        // One vector store per row: std::copy here became a `rep movsq`
        // per 64 bytes, 43% of the packing's time.
        for (int i = 0; i < W; ++i)
          Simd<T>::storeu(dst + (k0 + i) * nw + c0, Simd<T>::load(tile + i * W));
      }
      for (int64_t c = 0; c < W; ++c)
        for (int64_t k = kw; k < lp.K; ++k) dst[k * nw + c0 + c] = rows[c * lp.w_ld + k];
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

  // One task: rows [m0, m0 + kLinearRowBlock) times the panels of group g,
  // K slice by K slice (the group's panel slices stay in L2 for all the
  // rows). The last rows of the matrix, fewer than MR, go through
  // zero-padded copies.
  void run(int64_t rb, int64_t g, Arena& arena) const {
    const T* x = static_cast<const T*>(lp.x);
    T* out = static_cast<T*>(lp.out);
    const int64_t m0 = rb * kLinearRowBlock, m1 = std::min(lp.M, m0 + kLinearRowBlock);
    const int64_t p0 = g * kLinearPanelGroup, p1 = std::min(panels, p0 + kLinearPanelGroup);
    const int64_t n0 = p0 * NR, n1 = std::min(lp.N, p1 * NR);
    const int64_t tail = (m1 - m0) % MR, whole = m1 - tail;
    arena.reset(sizeof(T) * MR * (lp.K + n1 - n0) + 2 * 64);
    T* a_tail = arena.carve<T>(MR * lp.K);
    T* c_tail = arena.carve<T>(MR * (n1 - n0));
    if (tail) {
      std::fill(a_tail, a_tail + MR * lp.K, T(0));
      for (int64_t r = 0; r < tail; ++r)
        std::copy(x + (whole + r) * lp.x_ld, x + (whole + r) * lp.x_ld + lp.K, a_tail + r * lp.K);
    }
    const T* bias = static_cast<const T*>(lp.bias);
    for (int64_t k0 = 0; k0 < lp.K; k0 += kLinearKc) {
      const int64_t kd = std::min(kLinearKc, lp.K - k0);
      const bool last = k0 + kd == lp.K;
      // MR rows against each panel of the group in turn: the rows' slice
      // (MR x kd, 6 KiB) stays in L1 and is broadcast from there, while
      // the panels' slices stream from L2 as whole sequential lines.
      // Panel-major instead (a 36 KiB panel slice held in L1 while 8-row
      // groups of x stream past) left too little of L1 for the strided
      // rows of x: 1-10% slower at (1024, 768, 2304) in five paired runs.
      const auto rows_times_group = [&](const T* a, int64_t lda, T* c, int64_t ldc) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t nw = width(p);
          const T* pb = last && bias ? bias + p * NR : nullptr;  // added after the sum (x w^T) + b
          rows_times_slice(a + k0, lda, panel(p) + k0 * nw, nw, kd, c + (p - p0) * NR, ldc,
                           k0 > 0, pb);
        }
      };
      for (int64_t m = m0; m < whole; m += MR)
        rows_times_group(x + m * lp.x_ld, lp.x_ld, out + m * lp.out_ld + n0, lp.out_ld);
      if (tail) rows_times_group(a_tail, lp.K, c_tail, n1 - n0);
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

// out = x w^T (+ bias). N must be a multiple of W (the Python layer sends
// other shapes to NumPy).
template <typename T>
void linear_typed(const LinearParams& lp) {
  LinearPlan<T> plan(lp);
  const size_t bytes = PrefillTiling<T>::round_up(
      std::max<int64_t>(plan.panels * LinearPlan<T>::NR * lp.K, 1) * sizeof(T), 64);
  T* packed = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (!packed) throw std::bad_alloc();
  struct Free { T* p; ~Free() { std::free(p); } } free_packed{packed};
  plan.packed = packed;
  parallel_for(plan.panels, [&](int64_t p, int) {
    alignas(64) T tile[LinearPlan<T>::W * LinearPlan<T>::W];
    plan.pack(p, tile);
  });
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

// The width N must be a multiple of.
int64_t linear_lanes(DType dtype) { return dtype == DType::f64 ? Simd<double>::W : Simd<float>::W; }
