// The feed-forward blocks' activations, in place on float32 rows, on the
// pool. A fragment included inside tileattn::<isa> (see kernel_common.h).
//
// Why here and not in NumPy: the exact GELU took 18 NumPy passes, and its
// threads (Python's, one chunk each) did not scale: 8.4 ms at 1 thread and
// 7.8 ms at 2 for MiniLM's (2461, 1536) hidden rows (BENCHMARKS.md,
// "Projections"), 12% of an embedding batch that then stayed serial.
//
// Each activation is x * sigmoid(k(x)), sigmoid(z) = 1 / (1 + 2^(-z log2 e)),
// which has no cancellation for negative x (y + y tanh(g) loses every digit
// as tanh -> -1):
//   gelu (exact, erf):  k = x H((x/2)^2), H the fit of activations.py
//                       (_HALF_FORM: 2 G(4 t), erf(x / sqrt 2) = tanh(x G(x^2))
//                       to float32 accuracy on |x| <= 6, H > 0 everywhere);
//   gelu_tanh:          k = 2 sqrt(2/pi) (x + 0.044715 x^3);
//   silu:               k = x.
// Where the exponent passes 127 the result is 0 (the exact value is below
// 2^-127 |x|, which underflows for any float x). Elementwise, so a row's
// bits do not depend on the rows around it or the thread count.

constexpr float kGeluHalfForm[] = {1.4792598406537951e-05f, -2.733093173535296e-04f,
                                   2.0322289333858778e-03f, -7.070822265495959e-03f,
                                   -1.0600920125460468e-03f, 0.2906742463271756f,
                                   1.5957684337421534f};

template <int kKind>
inline Simd<float>::reg activation_reg(Simd<float>::reg x) {
  using S = Simd<float>;
  using reg = S::reg;
  reg k;
  if constexpr (kKind == static_cast<int>(ActivationKind::gelu)) {
    const reg y = S::mul(x, S::set1(0.5f));
    const reg t = S::mul(y, y);
    reg p = S::set1(kGeluHalfForm[0]);
    for (size_t i = 1; i < sizeof(kGeluHalfForm) / sizeof(float); ++i)
      p = S::fmadd(p, t, S::set1(kGeluHalfForm[i]));
    k = S::mul(x, p);
  } else if constexpr (kKind == static_cast<int>(ActivationKind::gelu_tanh)) {
    const reg x2 = S::mul(x, x);
    const reg inner = S::fmadd(S::mul(x2, S::set1(0.044715f)), x, x);
    k = S::mul(inner, S::set1(1.5957691216057308f));  // 2 sqrt(2 / pi)
  } else {
    k = x;
  }
  const reg a = S::mul(k, S::set1(-kLog2eOf<float>));
  const reg y = S::div(x, S::add(S::set1(1.0f), vec_exp2<S>(a)));
  // Past the clamp at 2^127 the sigmoid is below 2^-127: the result is 0
  // (x * sigmoid would underflow for any float x), not x / 2^127.
  // (A NaN a leaves max(NaN - 127, 0) = 0: the NaN result is kept.)
  const reg past = S::max(S::sub(a, S::set1(127.0f)), S::zero());
  return S::keep_where_zero(past, y, S::zero());
}

template <int kKind>
void activation_rows(const ActivationParams& ap) {
  using S = Simd<float>;
  constexpr int W = S::W;
  const int64_t per_task =
      std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, ap.cols * int64_t(sizeof(float))));
  const int64_t tasks = (ap.rows + per_task - 1) / per_task;
  parallel_for(tasks, [&](int64_t task, int) {
    alignas(64) float tail[W];
    const int64_t r1 = std::min(ap.rows, (task + 1) * per_task);
    for (int64_t r = task * per_task; r < r1; ++r) {
      float* x = ap.x + r * ap.ld;
      int64_t c = 0;
      for (; c + W <= ap.cols; c += W) {
        typename S::reg v = S::loadu(x + c);
        if (ap.bias) v = S::add(v, S::loadu(ap.bias + c));
        S::storeu(x + c, activation_reg<kKind>(v));
      }
      if (c < ap.cols) {  // the last columns through a padded register
        const int64_t n = ap.cols - c;
        std::fill(tail, tail + W, 0.0f);
        for (int64_t i = 0; i < n; ++i) tail[i] = ap.bias ? x[c + i] + ap.bias[c + i] : x[c + i];
        S::store(tail, activation_reg<kKind>(S::load(tail)));
        std::copy(tail, tail + n, x + c);
      }
    }
  });
}

void activation(const ActivationParams& ap) {
  if (ap.rows == 0 || ap.cols == 0) return;
  switch (ap.kind) {
    case ActivationKind::gelu: return activation_rows<static_cast<int>(ActivationKind::gelu)>(ap);
    case ActivationKind::gelu_tanh:
      return activation_rows<static_cast<int>(ActivationKind::gelu_tanh)>(ap);
    case ActivationKind::silu: return activation_rows<static_cast<int>(ActivationKind::silu)>(ap);
  }
}
