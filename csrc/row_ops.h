// Row-wise work around the projections, on the library's pool: the layer
// norm of token rows. Each row is reduced in one fixed order (kLanes
// partial sums, then combined lane by lane), so a row has the same bits
// whatever rows are around it and whatever the thread count.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace tileattn {

// rows (M x E, row stride ld elements, in place) = (rows - mean) / sqrt(var
// + eps) * weight + bias, mean and var (no Bessel correction) over each
// row. weight and bias (E) may be null (1 and 0). If inv_std is not null it
// receives 1 / sqrt(var + eps) per row (the backward's saved statistic).
void layer_norm_rows(DType dtype, int64_t M, int64_t E, void* rows, int64_t ld,
                     const void* weight, const void* bias, double eps, void* inv_std);

// Rows of row_bytes bytes moved on the pool, for the padding-skipping paths:
// dst row dst_index[i] (or i, if dst_index is null) = src row src_index[i]
// (or i), for i < n; then dst rows zero_index[j] = 0, for j < n_zero. Strides
// in bytes. Indices are trusted (the binding checks them).
void move_rows(const char* src, int64_t src_stride, const int64_t* src_index, char* dst,
               int64_t dst_stride, const int64_t* dst_index, int64_t n, int64_t row_bytes,
               const int64_t* zero_index, int64_t n_zero);

}  // namespace tileattn
