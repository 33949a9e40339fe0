// The attention kernels of one instruction set. kernel_<isa>.cpp includes
// its simd_<isa>.h, defines TILEATTN_ISA_NS and includes this file, so the
// same source is compiled once per instruction set, each copy in its own
// namespace (see kernel_common.h for why that matters).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <utility>

#include "attention_params.h"
#include "simd_exp.h"
#include "thread_pool.h"

namespace tileattn {
namespace TILEATTN_ISA_NS {

#include "dropout_hash.h"
#include "kernel_common.h"
#include "kernel_prefill.h"

void attention_forward(const AttentionParams& p) {
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  if (p.dtype == DType::f64)
    prefill_forward<double>(p);
  else
    prefill_forward<float>(p);
}

}  // namespace TILEATTN_ISA_NS
}  // namespace tileattn
