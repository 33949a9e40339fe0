#include "dispatch.h"

#include <atomic>
#include <stdexcept>
#include <string>

namespace tileattn {
namespace {
std::atomic<int> g_isa{-1};
}

Isa active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = static_cast<int>(best_isa());
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}

void set_active_isa(Isa isa) {
  bool built = false;
  for (Isa b : isas_built()) built = built || b == isa;
  if (!built)
    throw std::invalid_argument(std::string("ISA path '") + isa_name(isa) +
                                "' is not compiled into this build");
  if (!cpu_supports(isa))
    throw std::invalid_argument(std::string("this CPU cannot run the '") + isa_name(isa) +
                                "' path");
  g_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

const KernelTable& kernels() { return kernels_for(active_isa()); }

const KernelTable& kernels_for(Isa isa) {
  switch (isa) {
#if defined(TILEATTN_HAVE_X86)
    case Isa::avx512_bf16: return avx512_bf16::kernels;
    case Isa::avx512: return avx512::kernels;
    case Isa::avx2: return avx2::kernels;
#endif
    default: return baseline::kernels;
  }
}

}  // namespace tileattn
