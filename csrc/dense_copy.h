// A strided 4-D array copied to dense rows on the library's pool: the
// attention core's K and V when their rows are far apart (heads of a fused
// projection), copied once instead of read from scattered rows by every
// query block.
#pragma once

#include <cstdint>

namespace tileattn {

// dst (shape[0] x shape[1] x shape[2] x shape[3], C order) = src, whose
// strides are in bytes (the last one may be any value, including 0).
void copy_dense(const void* src, const int64_t shape[4], const int64_t src_strides[4],
                int64_t itemsize, void* dst);

}  // namespace tileattn
