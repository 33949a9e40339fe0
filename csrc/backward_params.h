// The description of one attention backward call: the forward's
// AttentionParams (inputs, masks, dropout, scale; `out` and `lse` are read,
// not written) plus the incoming gradient and the gradients to write.
// Raw pointers and element strides, like the forward; nothing is owned.
#pragma once

#include "attention_params.h"

namespace tileattn {

struct BackwardParams {
  // q, k, v, masks, key_lengths, dropout and scale as in the forward that
  // produced `out`. fwd.out (B, Hq, Lq, Dv) is the forward's output (after
  // dropout) and fwd.lse (B, Hq, Lq, float64) its natural-log log-sum-exp
  // (-inf for a row that saw no key); both are inputs here. kv_half is not supported.
  AttentionParams fwd;

  // dL/d(out), (B, Hq, Lq, Dv).
  const void* dout = nullptr;
  Strides4 dout_stride;

  // Results, written whole: dq (B, Hq, Lq, D), dk (B, Hkv, Lk, D),
  // dv (B, Hkv, Lk, Dv). Keys no query sees (or past key_lengths) get 0.
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides4 dq_stride, dk_stride, dv_stride;

  // Optional dL/d(scores) in natural-log units, (B, Hq, Lq, Lk), which is
  // the gradient of an additive attn_mask before summing over the axes it
  // broadcasts along. Zero-filled by the caller: entries of key blocks that
  // no query of a block can see are never written.
  void* dscores = nullptr;
  Strides4 dscores_stride;
};

}  // namespace tileattn
