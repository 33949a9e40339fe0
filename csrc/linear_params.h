// What the linear (affine) kernel reads and writes: out = x w^T + bias.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace tileattn {

// x (M x K), w (N x K), out (M x N), bias (N) or null; strides in elements
// along the rows (elements within a row are contiguous).
struct LinearParams {
  DType dtype = DType::f32;  // of x, bias and out
  // Products::bf16: x (float32) and w rounded to bf16, float32 sums.
  Products products = Products::native;
  int64_t M = 0, N = 0, K = 0;
  const void* x = nullptr;
  int64_t x_ld = 0;
  const void* w = nullptr;
  int64_t w_ld = 0;
  bool w_bf16 = false;  // w holds bf16 values already (bf16 products only)
  const void* bias = nullptr;
  void* out = nullptr;
  int64_t out_ld = 0;
  // w already packed for the active path and products (linear_pack), or null: then w is
  // packed on every call, which reads it twice more than the product does
  // when x has few rows.
  const void* packed = nullptr;
};

// The feed-forward activations the core computes (float32; kernel_activation.h).
enum class ActivationKind : int { gelu = 0, gelu_tanh = 1, silu = 2 };

// x (rows x cols, row stride ld elements, in place) = act(x + bias); bias
// (cols) or null.
struct ActivationParams {
  ActivationKind kind = ActivationKind::gelu;
  int64_t rows = 0, cols = 0, ld = 0;
  float* x = nullptr;
  const float* bias = nullptr;
};

}  // namespace tileattn
