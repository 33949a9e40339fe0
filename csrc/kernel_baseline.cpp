// The attention kernel compiled for the baseline path (see CMakeLists.txt for
// the flags this file gets).
#include "simd_baseline.h"

#define TILEATTN_ISA_NS baseline
#include "attention_kernel.h"
