// Runtime choice of the kernel path. Each instruction set's copy of the
// kernel lives in its own namespace (kernel_<isa>.cpp); this picks one.
#pragma once

#include "attention_params.h"
#include "backward_params.h"
#include "cpu_features.h"
#include "linear_params.h"

namespace tileattn {

// Declared once per compiled path, defined in kernel_<isa>.cpp.
namespace baseline {
void attention_forward(const AttentionParams& p);
void attention_backward(const BackwardParams& bp);
void linear_forward(const LinearParams& lp);
int64_t linear_lanes(DType dtype);
}
namespace avx2 {
void attention_forward(const AttentionParams& p);
void attention_backward(const BackwardParams& bp);
void linear_forward(const LinearParams& lp);
int64_t linear_lanes(DType dtype);
}
namespace avx512 {
void attention_forward(const AttentionParams& p);
void attention_backward(const BackwardParams& bp);
void linear_forward(const LinearParams& lp);
int64_t linear_lanes(DType dtype);
}

Isa active_isa();
// Throws std::invalid_argument when the path is not built or the CPU lacks it.
void set_active_isa(Isa isa);
void attention_forward(const AttentionParams& p);
void attention_backward(const BackwardParams& bp);
void linear_forward(const LinearParams& lp);
// The SIMD width of the active path, which linear_forward needs N to be a multiple of.
int64_t linear_lanes(DType dtype);

}  // namespace tileattn
