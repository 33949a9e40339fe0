"""The functional attention API: validation and shaping in Python, the
computation in C++ (``tileattn._core``) with the GIL released."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union, cast

import numpy as np

from . import _call
from ._call_checks import ArrayLike, Window, check_out
from ._validate import flag

__all__ = ["ArrayLike", "Window", "scaled_dot_product_attention"]


def scaled_dot_product_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    *,
    attn_mask: Optional[ArrayLike] = None,
    key_padding_mask: Optional[ArrayLike] = None,
    key_lengths: Optional[ArrayLike] = None,
    is_causal: bool = False,
    window: Window = None,
    causal_alignment: str = "bottom_right",
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    return_weights: bool = False,
    return_lse: bool = False,
    out: Optional[np.ndarray] = None,
    compute_dtype: Any = None,
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Multi-head scaled dot-product attention, ``softmax(q k^T * scale + mask) v``.

    Parameters
    ----------
    q : array, shape (B, Hq, Lq, D) or unbatched (Hq, Lq, D)
    k : array, shape (B, Hkv, Lk, D) or (Hkv, Lk, D)
        ``Hq`` must be a multiple of ``Hkv``: query head ``h`` uses key/value
        head ``h // (Hq // Hkv)`` (grouped-query / multi-query attention).
    v : array, shape (B, Hkv, Lk, Dv) or (Hkv, Lk, Dv)
    attn_mask : bool, integer or float array broadcastable to (B, Hq, Lq, Lk), optional
        Bool: True means "may attend"; integers: nonzero means "may attend"
        (Keras' 0/1 masks, Kaun's). Float: added to the scaled scores
        (``-inf`` blocks). Broadcast by strides, never expanded in memory.
    key_padding_mask : bool or integer array (B, Lk) (or (Lk,) unbatched), optional
        True (nonzero) marks a real token, False (0) padding: a tokenizer's
        1/0 attention mask as is. Float masks are refused. Note: PyTorch's
        polarity is the opposite (True = ignore). A mask of prefix form (each row all True,
        then all False) without causal/window options is passed to the
        kernel as key lengths, so it stops at each sequence's end.
    key_lengths : int array (B,) (a scalar unbatched), optional
        Ragged batches: item b has only keys ``[0, key_lengths[b])``; the
        keys past it are never read (no time is spent on padding). Causal
        and window masks align with each item's own length: query ``i``
        sees key ``j`` iff ``j <= i + key_lengths[b] - Lq``, as if the item
        were alone with ``Lk = key_lengths[b]``.
    is_causal : bool
        Bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + Lk - Lq``.
    window : int W or (left, right), optional
        Query ``i`` (aligned as above) sees keys ``i' - left <= j <= i' + right``;
        -1 is unbounded. An int ``W`` means ``(W - 1, 0)`` and implies causal.
        Key blocks outside the window are never computed.
    causal_alignment : ``"bottom_right"`` (default) or ``"top_left"``
        Where ``is_causal`` and ``window`` place query ``i`` among the keys
        when ``Lq != Lk``: bottom-right, ``i' = i + Lk - Lq`` (the last
        query sees every key: queries are the newest tokens, as in a KV
        cache), or top-left, ``i' = i`` (PyTorch's
        ``F.scaled_dot_product_attention(is_causal=True)`` and Keras'
        ``use_causal_mask=True``). With key lengths, bottom-right aligns to
        each item's own length and top-left to its first key. A top-left
        row with ``i' - left > Lk - 1`` sees no key and gives zeros.
    scale : float, optional
        Default ``1 / sqrt(D)``.
    dropout_p : float in [0, 1]
        Dropout on the attention weights (kept weights scaled by 1/(1-p)).
    seed : int, optional
        Makes dropout reproducible; drawn at random when omitted.
    return_weights : bool
        Also return the (B, Hq, Lq, Lk) attention weights (after dropout).
        This materialises the full matrix; the output alone never does.
    return_lse : bool
        Also return the per-row log-sum-exp of the scaled, masked scores
        (natural log; ``-inf`` for a row that sees no key), shape (B, Hq, Lq).
        It is what ``scaled_dot_product_attention_backward`` needs to
        recompute the weights. Always float64: rounded to float32 it would
        cost the recomputed weights digits when the scores are large.
    out : array (B, Hq, Lq, Dv), optional
        Preallocated output of the inputs' dtype; may be a strided view.
    compute_dtype : None or "bfloat16"
        "bfloat16" (float32, float16 or bfloat16 inputs): both products,
        ``q k^T`` and ``P v``, run on bf16 operands (q, k, v and the
        probabilities rounded to bf16, to nearest even) with float32 sums;
        the softmax, its running max and sum and the output stay float32.
        On CPUs with AVX512-BF16 (the ``avx512_bf16`` path) about 1.5x
        faster than float32 (BENCHMARKS.md). Forward only: the backward
        computes in float32.

    Returns
    -------
    out : array (B, Hq, Lq, Dv), the inputs' dtype
    weights : array (B, Hq, Lq, Lk), only with ``return_weights=True``
    lse : array (B, Hq, Lq), only with ``return_lse=True`` (always last)

    A query row that can see no key gives zeros (and zero weights).
    float16 and bfloat16 inputs are computed in float32 and returned in
    their dtype.
    """
    call = _call.describe(q, k, v, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                          key_lengths=key_lengths, is_causal=is_causal, window=window,
                          causal_alignment=causal_alignment, scale=scale,
                          dropout_p=dropout_p, seed=seed, compute_dtype=compute_dtype)
    flag("return_weights", return_weights)
    flag("return_lse", return_lse)
    if out is not None:
        out = check_out(out, call.inputs.out_shape, call.inputs.in_dtype)
    results = _call.forward(call, out=out, return_weights=return_weights, return_lse=return_lse)
    if len(results) == 1:
        return results[0]
    return cast(Tuple[np.ndarray, np.ndarray], tuple(results))
