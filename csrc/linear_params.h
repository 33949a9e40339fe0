// What the linear (affine) kernel reads and writes: out = x w^T + bias.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace tileattn {

// x (M x K), w (N x K), out (M x N), bias (N) or null; strides in elements
// along the rows (elements within a row are contiguous).
struct LinearParams {
  DType dtype = DType::f32;
  int64_t M = 0, N = 0, K = 0;
  const void* x = nullptr;
  int64_t x_ld = 0;
  const void* w = nullptr;
  int64_t w_ld = 0;
  const void* bias = nullptr;
  void* out = nullptr;
  int64_t out_ld = 0;
  // w already packed for the active path (linear_pack), or null: then w is
  // packed on every call, which reads it twice more than the product does
  // when x has few rows.
  const void* packed = nullptr;
};

}  // namespace tileattn
