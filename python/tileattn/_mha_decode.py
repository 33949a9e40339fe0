"""MultiHeadAttention's incremental decoding: self-attention of new tokens
against a ``KVCache`` (``mha(x, cache=cache)``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._call_checks import integers_as_bool
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._mha_core import heads_first
from ._validate import float_array, is_bfloat16
from .cache import KVCache, prefix_lengths

if TYPE_CHECKING:
    from .attention import MultiHeadAttention


def check_cached_call(mha: "MultiHeadAttention", cache: Any, query: Any, key: Any, value: Any,
                      attn_mask: Any, need_weights: bool) -> KVCache:
    """What a call with ``cache=`` may not combine, and the cache's fit."""
    if not isinstance(cache, KVCache):
        raise InvalidParameterError(
            f"cache: expected a tileattn.KVCache, got {type(cache).__name__}")
    for name, given in (("key", key is not None and key is not query),
                        ("value", value is not None and value is not query),
                        ("attn_mask", attn_mask is not None), ("need_weights", need_weights),
                        ("attention_axes", mha.attention_axes is not None)):
        if given:
            raise InvalidParameterError(
                f"{name}: not supported with cache= (incremental self-attention); "
                f"call without the cache for it")
    if not mha.packed:
        raise InvalidParameterError(
            f"cache: incremental self-attention needs kdim == vdim == embed_dim, got kdim="
            f"{mha.kdim}, vdim={mha.vdim}, embed_dim={mha.embed_dim}")
    want = (mha.num_kv_heads, mha.head_dim, mha.value_dim)
    got = (cache.num_kv_heads, cache.head_dim, cache.value_dim)
    if got != want:
        raise ShapeError(
            f"cache: expected (num_kv_heads, head_dim, value_dim) = {want} like the "
            f"module, got {got}")
    narrow = cache.dtype == np.float16 or is_bfloat16(cache.dtype)
    if cache.dtype != mha.dtype and not (narrow and mha.dtype == np.float32):
        raise DTypeError(
            f"cache: a {mha.dtype} module needs a {mha.dtype} cache"
            + (" or a float16 or bfloat16 one" if mha.dtype == np.float32 else "")
            + f", got {cache.dtype}")
    return cache


def forward_cached(mha: "MultiHeadAttention", query: Any, cache: KVCache, *,
                   key_padding_mask: Any, is_causal: bool, window: Any,
                   training: bool) -> np.ndarray:
    """``mha(query, cache=cache, ...)`` once ``check_cached_call`` passed."""
    x = float_array(query, "query")
    in_dtype = x.dtype
    unbatched = x.ndim == 2
    x3 = x[None] if unbatched else x
    if x3.ndim != 3 or x3.shape[-1] != mha.embed_dim:
        raise ShapeError(f"query: expected (B, T, {mha.embed_dim}) or unbatched "
                         f"(T, {mha.embed_dim}), got shape {x.shape}")
    b, t = x3.shape[:2]
    if b != cache.batch:
        raise ShapeError(f"query: batch {b} does not match the cache's batch "
                         f"{cache.batch}; got shape {x.shape}")
    counts = None
    if key_padding_mask is not None:
        kpm = integers_as_bool(np.asarray(key_padding_mask))   # nonzero = real, as everywhere
        counts = prefix_lengths(kpm[None] if unbatched else kpm, "key_padding_mask", (b, t))
    x3 = x3.astype(mha.dtype, copy=False)
    q, k, v = mha.split_heads(*mha.projections.project(x3, x3, x3, True, True))
    # Each sequence's new tokens sit at its own positions lengths[b] + i.
    q, k = mha.norm_and_rotate(q, k, positions=cache.lengths[:, None] + np.arange(t))
    p, seed = mha.dropout_draw(training)
    buf = np.empty((b, t, mha.num_heads, mha.value_dim), mha.dtype)
    cache.attend(heads_first(q), heads_first(k), heads_first(v),
                 counts=counts, is_causal=is_causal, window=window, dropout_p=p, seed=seed,
                 out=heads_first(buf), compute_dtype=mha.compute_dtype_option)
    # A cached forward keeps nothing for a backward, whatever out_proj's own mode.
    y: np.ndarray = mha.out_proj(buf.reshape(b, t, mha.num_heads * mha.value_dim),
                                 training=False)
    out: np.ndarray = (y[0] if unbatched else y).astype(in_dtype, copy=False)
    return out
