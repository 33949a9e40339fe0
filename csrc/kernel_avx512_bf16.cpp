// The kernels compiled for the avx512_bf16 path: the avx512 source with
// the bf16 dot product (vdpbf16ps) for bf16 products (see CMakeLists.txt
// for the flags). Its own namespace, Simd included: no inline function of
// this copy may stand in for avx512's on a CPU without the instruction.
#define TILEATTN_SIMD512_NS avx512_bf16
#include "simd_avx512.h"

#define TILEATTN_ISA_NS avx512_bf16
#include "attention_kernel.h"
