// The description of one attention call that crosses from the Python
// boundary into the kernels: raw pointers, element strides and scalar mask
// options. Nothing here owns memory; the caller keeps the arrays alive.
//
// Masks are described, not materialised: causal and sliding windows are two
// integers, a broadcast (Lq, Lk) mask has zero batch/head strides, and key
// padding is one (B, Lk) row set, so no mask is ever expanded to
// (B, Hq, Lq, Lk).
#pragma once

#include <cstdint>

namespace tileattn {

enum class DType : int { f32 = 0, f64 = 1 };
// The operands of the products: the data's own dtype, or rounded to
// bfloat16 with float32 sums (compute_dtype="bfloat16"; kernel_bf16.h).
enum class Products : int { native = 0, bf16 = 1 };
enum class MaskKind : int { none = 0, boolean = 1, additive = 2 };

// Strides in elements, in the order (batch, head, row, column).
struct Strides4 {
  int64_t b = 0, h = 0, r = 0, c = 0;
};

struct AttentionParams {
  DType dtype = DType::f32;
  // Products::bf16 (float32 only): both products on bf16 operands, float32
  // softmax and sums (kernel_prefill_bf16.h).
  Products products = Products::native;

  // Shapes: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv),
  // out (B, Hq, Lq, Dv). Query head h reads key/value head h / (Hq / Hkv).
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, Dv = 0;
  const void* q = nullptr;
  const void* k = nullptr;  // of the compute dtype, or binary16 when kv_half
  const void* v = nullptr;
  // K and V stored as IEEE binary16 or as bfloat16 (a half-size KV cache)
  // and widened to float32 as the kernel reads them; q and out are float32.
  bool kv_half = false;
  bool kv_bf16 = false;
  bool kv_narrow() const { return kv_half || kv_bf16; }
  void* out = nullptr;
  Strides4 q_stride, k_stride, v_stride, out_stride;

  double scale = 1.0;

  // Query i, aligned as i', sees key j iff
  // i' - window_left <= j <= i' + window_right; -1 means unbounded.
  // is_causal is folded in by the caller as window_right = 0.
  int64_t window_left = -1;
  int64_t window_right = -1;
  // The alignment: bottom-right, i' = i + Lk - Lq (the last query sees the
  // last key: a KV cache's queries are its newest tokens), or top-left,
  // i' = i (PyTorch's and Keras' is_causal when Lq != Lk).
  bool top_left = false;

  // General mask, broadcast to (B, Hq, Lq, Lk) by its strides. A boolean mask
  // is bytes (nonzero = may attend); an additive one has the input's dtype.
  MaskKind mask_kind = MaskKind::none;
  const void* mask = nullptr;
  Strides4 mask_stride;

  // Ragged batches: batch item b has only keys [0, key_lengths[b]) (<= Lk);
  // the kernel never reads past them, and causal/window alignment uses each
  // item's own length (query i sees j <= i + key_lengths[b] - Lq). May be null.
  const int64_t* key_lengths = nullptr;

  // Key padding, (B, Lk) bytes, nonzero = real token. May be null.
  const uint8_t* key_padding = nullptr;
  int64_t key_padding_stride_b = 0, key_padding_stride_k = 0;

  // Dropout on the attention weights, reproducible from the seed.
  double dropout_p = 0.0;
  uint64_t seed = 0;

  // Optional outputs. weights: (B, Hq, Lq, Lk), zero-filled by the caller
  // (blocks the mask hides are never written). lse: (B, Hq, Lq) per-row
  // log-sum-exp of the scaled, masked scores (-inf for a row that sees no
  // key), kept for the backward pass. The lse is float64 whatever the
  // compute dtype: rounded to float32 it would carry an error of
  // eps * |lse| into every weight the backward recomputes from it.
  void* weights = nullptr;
  Strides4 weights_stride;
  double* lse = nullptr;
  Strides4 lse_stride;  // c unused

  int64_t group_size() const { return Hkv > 0 ? Hq / Hkv : 1; }
};

}  // namespace tileattn
