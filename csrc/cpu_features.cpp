#include "cpu_features.h"

namespace tileattn {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512_bf16: return "avx512_bf16";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

std::vector<Isa> isas_built() {
#if defined(TILEATTN_HAVE_X86)
  return {Isa::baseline, Isa::avx2, Isa::avx512, Isa::avx512_bf16};
#else
  return {Isa::baseline};
#endif
}

// __builtin_cpu_supports checks the CPUID bits and, for AVX and AVX-512,
// that the OS saves the wider registers (XCR0), so a "yes" is safe to run.
bool cpu_supports(Isa isa) {
#if defined(TILEATTN_HAVE_X86)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::baseline: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::avx512:
      return cpu_supports(Isa::avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl");
    case Isa::avx512_bf16:
      return cpu_supports(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::baseline;
#endif
}

Isa best_isa() {
  Isa best = Isa::baseline;
  for (Isa isa : isas_built())
    if (cpu_supports(isa)) best = isa;
  return best;
}

std::vector<std::pair<std::string, bool>> cpu_feature_list() {
  std::vector<std::pair<std::string, bool>> out;
#if defined(TILEATTN_HAVE_X86)
  __builtin_cpu_init();
  out.emplace_back("sse4.2", __builtin_cpu_supports("sse4.2"));
  out.emplace_back("avx", __builtin_cpu_supports("avx"));
  out.emplace_back("avx2", __builtin_cpu_supports("avx2"));
  out.emplace_back("fma", __builtin_cpu_supports("fma"));
  out.emplace_back("f16c", __builtin_cpu_supports("f16c"));
  out.emplace_back("avx512f", __builtin_cpu_supports("avx512f"));
  out.emplace_back("avx512dq", __builtin_cpu_supports("avx512dq"));
  out.emplace_back("avx512bw", __builtin_cpu_supports("avx512bw"));
  out.emplace_back("avx512vl", __builtin_cpu_supports("avx512vl"));
  out.emplace_back("avx512bf16", __builtin_cpu_supports("avx512bf16"));
#elif defined(__aarch64__)
  out.emplace_back("neon", true);
#endif
  return out;
}

}  // namespace tileattn
