// The attention kernels of one instruction set. kernel_<isa>.cpp includes
// its simd_<isa>.h, defines TILEATTN_ISA_NS and includes this file, so the
// same source is compiled once per instruction set, each copy in its own
// namespace (see kernel_common.h for why that matters).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "attention_params.h"
#include "backward_params.h"
#include "dispatch.h"
#include "linear_params.h"
#include "simd_exp.h"
#include "thread_pool.h"

namespace tileattn {
namespace TILEATTN_ISA_NS {

#include "dropout_hash.h"
#include "kernel_common.h"
#include "score_mask.h"
#include "kernel_bf16.h"
#include "kernel_prefill.h"
#include "kernel_decode.h"
#include "kernel_gemm.h"
#include "kernel_backward.h"
#include "kernel_linear.h"
#include "kernel_activation.h"

// Few queries against the keys (decode) take the decode path unless the
// weights or dropout are asked for; both paths give a row the same bits
// (with bf16 products, on the paths without the bf16 dot product).
inline bool takes_decode_path(const AttentionParams& p) {
  return p.Lq <= kDecodeMaxQueries && !p.weights && p.dropout_p == 0.0;
}

template <typename T, typename KV>
void forward_typed(const AttentionParams& p) {
  if (takes_decode_path(p)) {
    decode_forward<T, KV>(p);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (p.products == Products::bf16) {
      prefill_forward_items_bf16<KV>(&p, 1);
      return;
    }
  }
  prefill_forward<T, KV>(p);
}

void attention_forward(const AttentionParams& p) {
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  if (p.kv_half)
    forward_typed<float, Half>(p);
  else if (p.kv_bf16)
    forward_typed<float, Bf16>(p);
  else if (p.dtype == DType::f64)
    forward_typed<double, double>(p);
  else
    forward_typed<float, float>(p);
}

// Calls that share the dtype, D, Dv and the strides, as one job: the
// sequences of a variable-length batch. The prefill path (the decode path
// gives a row the same bits), but for short sequences with bf16 products.
void attention_forward_items(const AttentionParams* items, int64_t n) {
  if (n == 0) return;
  if (items[0].products == Products::bf16) {
    // A sequence short enough for the decode path takes it, as alone: with
    // bf16 products the two paths' bits differ on the bf16-dot path.
    std::vector<AttentionParams> rest;
    for (int64_t i = 0; i < n; ++i) {
      if (takes_decode_path(items[i]))
        attention_forward(items[i]);
      else
        rest.push_back(items[i]);
    }
    const int64_t m = static_cast<int64_t>(rest.size());
    if (m == 0) return;
    if (rest[0].kv_half)
      prefill_forward_items_bf16<Half>(rest.data(), m);
    else if (rest[0].kv_bf16)
      prefill_forward_items_bf16<Bf16>(rest.data(), m);
    else
      prefill_forward_items_bf16<float>(rest.data(), m);
  } else if (items[0].kv_half)
    prefill_forward_items<float, Half>(items, n);
  else if (items[0].kv_bf16)
    prefill_forward_items<float, Bf16>(items, n);
  else if (items[0].dtype == DType::f64)
    prefill_forward_items<double, double>(items, n);
  else
    prefill_forward_items<float, float>(items, n);
}

// The backward reads K and V in the compute dtype only (no binary16 cache).
void attention_backward(const BackwardParams& bp) {
  if (bp.fwd.B == 0 || bp.fwd.Hq == 0) return;
  if (bp.fwd.dtype == DType::f64)
    backward_typed<double>(bp);
  else
    backward_typed<float>(bp);
}

extern const KernelTable kernels;
const KernelTable kernels = {&attention_forward, &attention_forward_items, &attention_backward,
                             &linear_forward,
                             &linear_packed_bytes, &linear_pack, &linear_unpack,
                             &activation};

}  // namespace TILEATTN_ISA_NS
}  // namespace tileattn
