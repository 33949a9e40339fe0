// Counter-based randomness for dropout: the keep/drop decision for weight
// (b, h, i, j) is a pure function of (seed, flat index), so the forward,
// the weights pass and a later backward all see the same mask, whatever
// thread computes which block. The mixer is the splitmix64 finaliser.
//
// A fragment included inside the ISA namespace (see kernel_common.h); the
// tests re-implement the same function in NumPy.
#pragma once

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

// Uniform in [0, 1) with 53 random bits.
inline double dropout_uniform(uint64_t seed, uint64_t index) {
  const uint64_t stream = mix64(seed ^ 0x9e3779b97f4a7c15ULL);
  const uint64_t bits = mix64(stream + index * 0x9e3779b97f4a7c15ULL);
  return static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);
}
