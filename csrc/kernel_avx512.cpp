// The attention kernel compiled for the avx512 path (see CMakeLists.txt for
// the flags this file gets).
#include "simd_avx512.h"

#define TILEATTN_ISA_NS avx512
#include "attention_kernel.h"
