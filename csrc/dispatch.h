// Runtime choice of the kernel path. Each instruction set's copy of the
// kernel lives in its own namespace (kernel_<isa>.cpp) and exports one
// KernelTable; this picks the active path's table.
#pragma once

#include "attention_params.h"
#include "backward_params.h"
#include "cpu_features.h"
#include "linear_params.h"

namespace tileattn {

// The entry points every compiled path provides, declared once.
struct KernelTable {
  void (*attention_forward)(const AttentionParams& p);
  // n calls sharing dtype, D, Dv and strides, run as one job on the pool.
  void (*attention_forward_items)(const AttentionParams* items, int64_t n);
  void (*attention_backward)(const BackwardParams& bp);
  void (*linear_forward)(const LinearParams& lp);
  // Bytes of lp's N x K weight packed for this path's linear_forward.
  int64_t (*linear_packed_bytes)(const LinearParams& lp);
  // Packs lp.w into dst (linear_packed_bytes, 64-byte aligned).
  void (*linear_pack)(const LinearParams& lp, void* dst);
  // The inverse: rows [r0, r1) of lp.packed (this path's layout) into dst,
  // row-major (float32 values of bf16 weights).
  void (*linear_unpack)(const LinearParams& lp, int64_t r0, int64_t r1, void* dst);
  // The feed-forward activation of float32 rows, in place.
  void (*activation)(const ActivationParams& ap);
};

// Defined in kernel_<isa>.cpp (attention_kernel.h).
namespace baseline { extern const KernelTable kernels; }
namespace avx2 { extern const KernelTable kernels; }
namespace avx512 { extern const KernelTable kernels; }
namespace avx512_bf16 { extern const KernelTable kernels; }

Isa active_isa();
// Throws std::invalid_argument when the path is not built or the CPU lacks it.
void set_active_isa(Isa isa);
// The active path's kernels.
const KernelTable& kernels();
// The kernels of path `isa` (a built one: what packed a weight on it can
// read it back after another path became active).
const KernelTable& kernels_for(Isa isa);

}  // namespace tileattn
