// Probe (not part of the package): can AMX compute float32-accurate
// attention scores faster than AVX-512 FMAs? S = Q K^T for one prefill tile
// (M queries x N keys, head size D) with each float32 operand split into
// three bf16 parts, hi + mid + lo, and the six products down to 2^-16
// (hl, lh, mm, hm, mh, hh) summed by tdpbf16ps; with -DNPROD=3, the three
// products of a two-part split (bf16x2 accuracy, for comparison). Prints
// the error against float64 beside that of the kernel's float32 chains,
// the throughput with the tile loads a kernel needs, without them (the
// instruction's own rate), with both operands in L1, and with each part
// of a query tile reused against the key parts (fewer tile loads), beside
// the rate of a pure AVX-512 FMA loop in the same process (the float32
// path's ceiling), and the cost of splitting a tile of P (what the P V
// product would pay every block).
// Needs a CPU with AMX-BF16 and a kernel that grants the tile state:
//   g++ -O2 -std=c++17 -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16
//       -mavx512bw -mavx512vl -mfma benchmarks/amx_split_probe.cpp -o /tmp/amx_probe
// The figures are in BENCHMARKS.md (stop 16).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#ifndef NPROD
#define NPROD 6
#endif
constexpr int M = 96, N = 256, D = 64, P = NPROD, DP = P * D;  // DP: depth of the split product
// Products, smallest first (hl, lh, mm, hm, mh, hh), so the chain adds the
// small terms before the large ones.
static const int qpart6[6] = {0, 2, 1, 0, 1, 0};
static const int kpart6[6] = {2, 0, 1, 1, 0, 0};
static const int qpart3[3] = {0, 1, 0};
static const int kpart3[3] = {1, 0, 0};

struct alignas(64) TileCfg {
  uint8_t palette, start;
  uint8_t pad[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static inline uint16_t bf16_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
static inline float bf16_to_f(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static void split3(float f, uint16_t out[3]) {
  for (int i = 0; i < 3; ++i) {
    out[i] = bf16_rne(f);
    f -= bf16_to_f(out[i]);
  }
}
static inline void split3_vec(__m512 x, __m256bh& h, __m256bh& m, __m256bh& l) {
  h = _mm512_cvtneps_pbh(x);
  __m512 r = _mm512_sub_ps(x, _mm512_cvtpbh_ps(h));
  m = _mm512_cvtneps_pbh(r);
  r = _mm512_sub_ps(r, _mm512_cvtpbh_ps(m));
  l = _mm512_cvtneps_pbh(r);
}

// Variant 3's step for one key tile: accumulator tile C += the six
// products of the query parts in tiles 2-4 (hi, mid, lo) with the key
// parts kh, km, kl, each key part loaded once (tile ids are immediates,
// hence the template).
template <int C>
static inline void parts_products(const uint16_t* kh, const uint16_t* km, const uint16_t* kl) {
  _tile_loadd(5, kh, 64);
  _tile_loadd(6, km, 64);
  _tile_dpbf16ps(C, 2, 5);
  _tile_dpbf16ps(C, 3, 5);
  _tile_dpbf16ps(C, 4, 5);
  _tile_dpbf16ps(C, 2, 6);
  _tile_dpbf16ps(C, 3, 6);
  _tile_loadd(5, kl, 64);
  _tile_dpbf16ps(C, 2, 5);
}

// The AVX-512 FMA rate of this core: 12 independent chains of vfmadd.
static double fma_peak_gflops() {
  constexpr int kChains = 12;
  const long iters = 20000000;
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(float(c));
  const __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], x, y);
  }
  const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0;
  for (int c = 0; c < kChains; ++c) sink += _mm512_reduce_add_ps(acc[c]);
  if (sink == 12345.f) std::puts("");
  return 2.0 * 16 * kChains * iters / t * 1e-9;
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023, 18)) {
    std::puts("no AMX permission");
    return 1;
  }
  const int* qpart = P == 6 ? qpart6 : qpart3;
  const int* kpart = P == 6 ? kpart6 : kpart3;
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  std::vector<float> q(M * D), k(N * D);
  for (auto& x : q) x = nd(g) * 0.125f;
  for (auto& x : k) x = nd(g);
  std::vector<uint16_t> a(M * DP), b(N * DP);
  std::vector<uint16_t> qs(M * D * 3), ks(N * D * 3);
  for (int i = 0; i < M * D; ++i) split3(q[i], &qs[i * 3]);
  for (int i = 0; i < N * D; ++i) split3(k[i], &ks[i * 3]);
  for (int i = 0; i < M; ++i)
    for (int pp = 0; pp < P; ++pp)
      for (int x = 0; x < D; ++x) a[i * DP + pp * D + x] = qs[(i * D + x) * 3 + qpart[pp]];
  const int chunks = DP / 32;
  for (int ng = 0; ng < N / 16; ++ng)
    for (int c = 0; c < chunks; ++c)
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n)
          for (int t = 0; t < 2; ++t) {
            const int dd = c * 32 + 2 * r + t, pp = dd / D, x = dd % D, key = ng * 16 + n;
            b[((ng * chunks + c) * 16 + r) * 32 + n * 2 + t] = ks[(key * D + x) * 3 + kpart[pp]];
          }
  // Variant 3's layouts: each part on its own, A row-major (16 x D per row
  // tile), B in VNNI tiles per (16 keys, 32-dim chunk).
  const int dchunks = D / 32;
  std::vector<uint16_t> ap(3 * M * D), bp(3 * N * D);
  for (int pt = 0; pt < 3; ++pt) {
    for (int i = 0; i < M * D; ++i) ap[pt * M * D + i] = qs[i * 3 + pt];
    for (int ng = 0; ng < N / 16; ++ng)
      for (int c = 0; c < dchunks; ++c)
        for (int r = 0; r < 16; ++r)
          for (int n = 0; n < 16; ++n)
            for (int t = 0; t < 2; ++t)
              bp[pt * N * D + ((ng * dchunks + c) * 16 + r) * 32 + n * 2 + t] =
                  ks[((ng * 16 + n) * D + c * 32 + 2 * r + t) * 3 + pt];
  }
  TileCfg cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  std::vector<float> s(M * N);
  // Variant 0: the whole M x N tile by 2 x 2 accumulator tiles (A's 32
  // rows from L1, B from L2), one tile load per product; 1: the same with
  // the tile loads hoisted out (the dot-product rate alone); 2: one 32 x 32
  // block 48 times (A and B both from L1).
  int variant = 0;
  // Variant 3: one row tile's three parts stay in tiles 2-4 for a chunk and
  // meet each key part as it is loaded (Kh x3, Km x2, Kl x1): 0.75 tile
  // loads per product instead of 1, two accumulators.
  auto run_parts = [&]() {
    auto kt = [&](int pt, int ng, int c) { return &bp[pt * N * D + (ng * dchunks + c) * 512]; };
    for (int i = 0; i < M; i += 16)
      for (int ng = 0; ng < N / 16; ng += 2) {
        _tile_zero(0);
        _tile_zero(1);
        for (int c = 0; c < dchunks; ++c) {
          _tile_loadd(2, &ap[0 * M * D + i * D + c * 32], D * 2);
          _tile_loadd(3, &ap[1 * M * D + i * D + c * 32], D * 2);
          _tile_loadd(4, &ap[2 * M * D + i * D + c * 32], D * 2);
          parts_products<0>(kt(0, ng, c), kt(1, ng, c), kt(2, ng, c));
          parts_products<1>(kt(0, ng + 1, c), kt(1, ng + 1, c), kt(2, ng + 1, c));
        }
        _tile_stored(0, &s[i * N + ng * 16], N * 4);
        _tile_stored(1, &s[i * N + ng * 16 + 16], N * 4);
      }
  };
  auto run = [&]() {
    if (variant == 3) return run_parts();
    for (int i = 0; i < M; i += 32)
      for (int ng = 0; ng < N / 16; ng += 2) {
        const int nb = variant == 2 ? 0 : ng;
        const int ib = variant == 2 ? 0 : i;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int c = 0; c < chunks; ++c) {
          if (variant != 1 || c == 0) {
          _tile_loadd(4, &a[ib * DP + c * 32], DP * 2);
          _tile_loadd(5, &a[(ib + 16) * DP + c * 32], DP * 2);
          _tile_loadd(6, &b[(nb * chunks + c) * 512], 64);
          _tile_loadd(7, &b[((nb + 1) * chunks + c) * 512], 64);
          }
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, &s[i * N + ng * 16], N * 4);
        _tile_stored(1, &s[i * N + ng * 16 + 16], N * 4);
        _tile_stored(2, &s[(i + 16) * N + ng * 16], N * 4);
        _tile_stored(3, &s[(i + 16) * N + ng * 16 + 16], N * 4);
      }
  };
  auto check = [&]() {
  double e_amx = 0, e_f32 = 0, r_amx = 0, r_f32 = 0;
  int cnt = 0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double t = 0, mag = 0;
      for (int x = 0; x < D; ++x) {
        t += double(q[i * D + x]) * k[j * D + x];
        mag += std::fabs(double(q[i * D + x]) * k[j * D + x]);
      }
      float tot = 0;
      for (int x0 = 0; x0 < D; x0 += 16) {
        float acc = 0;
        for (int x = x0; x < x0 + 16; ++x) acc = std::fma(q[i * D + x], k[j * D + x], acc);
        tot = x0 ? tot + acc : acc;
      }
      // errors in units of eps * sum |terms| (the scale of a dot's rounding)
      const double unit = std::ldexp(mag, -24);
      const double ea = std::fabs(s[i * N + j] - t) / unit, ef = std::fabs(tot - t) / unit;
      e_amx = std::max(e_amx, ea);
      e_f32 = std::max(e_f32, ef);
      r_amx += ea * ea;
      r_f32 += ef * ef;
      ++cnt;
    }
  std::printf("%d products. error / (2^-24 sum|terms|): AMX max %.2f rms %.3f | f32 16-segment chain max %.2f rms %.3f\n",
              P, e_amx, std::sqrt(r_amx / cnt), e_f32, std::sqrt(r_f32 / cnt));
  };
  run();
  check();
  if (P == 6) {
    variant = 3;
    run();
    std::printf("variant 3: ");
    check();
  }
  std::printf("AVX-512 FMA loop on this core: %.1f GFLOP/s (float32)\n", fma_peak_gflops());
  const int reps = 4000;
  const double flops = 2.0 * M * N * D;
  const char* names[4] = {"A from L1, B from L2", "no tile loads", "A and B from L1",
                          "parts reused, 0.75 loads per product"};
  double t_full = 0;
  for (variant = 0; variant < (P == 6 ? 4 : 3); ++variant) {
    std::vector<double> ts;
    for (int rep = 0; rep < 7; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) run();
      ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
    }
    std::sort(ts.begin(), ts.end());
    if (variant == 0) t_full = ts[3];
    std::printf("AMX scores %dx%dx%d, %s: %.2f us, %.1f GFLOP/s float32-equivalent (%.2f bf16 TFLOP/s)\n",
                M, N, D, names[variant], ts[3] * 1e6, flops / ts[3] * 1e-9, flops * P / ts[3] * 1e-12);
  }
  std::printf("AVX-512 FMA loop again: %.1f GFLOP/s\n", fma_peak_gflops());
  std::vector<double> ts;
  std::vector<float> pm(M * N);
  for (auto& x : pm) x = nd(g);
  std::vector<uint16_t> ps(3 * M * N);
  ts.clear();
  for (int rep = 0; rep < 7; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r)
      for (int i = 0; i < M * N; i += 16) {
        __m256bh h, m, l;
        split3_vec(_mm512_loadu_ps(&pm[i]), h, m, l);
        _mm256_storeu_si256((__m256i*)&ps[i], (__m256i)h);
        _mm256_storeu_si256((__m256i*)&ps[M * N + i], (__m256i)m);
        _mm256_storeu_si256((__m256i*)&ps[2 * M * N + i], (__m256i)l);
      }
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  std::sort(ts.begin(), ts.end());
  std::printf("split of a %dx%d tile into 3 bf16 parts: %.2f us (%.0f%% of the first variant's time)\n", M, N,
              ts[3] * 1e6, 100.0 * ts[3] / t_full);
  _tile_release();
  return ps[7] == 12345;
}
