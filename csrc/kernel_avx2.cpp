// The attention kernel compiled for the avx2 path (see CMakeLists.txt for
// the flags this file gets).
#include "simd_avx2.h"

#define TILEATTN_ISA_NS avx2
#include "attention_kernel.h"
