"""Attention over sequences of different lengths packed end to end (the
layout of flash-attention's variable-length API): no padding is stored,
read or computed."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._call_checks import (NATIVE, ArrayLike, Window, as_input, check_out, kernel_array,
                           kernel_can_write, scale_value, top_left_alignment, window_bounds)
from ._errors import DTypeError, InvalidParameterError, ShapeError
from ._validate import bf16_products, shape_str

__all__ = ["varlen_attention"]


def _offsets(values: Any, total: int, name: str, of: str) -> np.ndarray:
    """(n + 1,) int64 offsets from 0 to total, never decreasing."""
    a = np.asarray(values)
    if a.ndim != 1 or a.shape[0] < 1:
        raise ShapeError(f"{name}: expected a 1-D array of n + 1 offsets (0, ..., {total}), "
                         f"got shape {shape_str(a.shape)}")
    if a.dtype.kind not in "iu":
        raise DTypeError(f"{name}: expected integers, got {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if a[0] != 0 or a[-1] != total:
        raise InvalidParameterError(f"{name}: expected offsets from 0 to {total} (the rows of "
                                    f"{of}), got {int(a[0])} to {int(a[-1])}")
    drops = np.flatnonzero(np.diff(a) < 0)
    if drops.size:
        i = int(drops[0]) + 1
        raise InvalidParameterError(f"{name}: offsets must not decrease; entry {i} is "
                                    f"{int(a[i])} after {int(a[i - 1])}")
    return a


def varlen_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    cu_seqlens_q: ArrayLike,
    cu_seqlens_k: Optional[ArrayLike] = None,
    *,
    is_causal: bool = False,
    window: Window = None,
    causal_alignment: str = "bottom_right",
    scale: Optional[float] = None,
    out: Optional[np.ndarray] = None,
    compute_dtype: Any = None,
) -> np.ndarray:
    """Attention of sequences of different lengths, packed end to end.

    Sequence ``i`` is rows ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of ``q``
    (and of the result) and rows ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]`` of
    ``k`` and ``v``; each attends only to its own keys, exactly as
    ``scaled_dot_product_attention`` of that sequence alone (the same bits),
    and nothing is spent on padding: a batch of 128 sentences of 5 to 60
    tokens costs what their tokens cost, not 128 x 60.

    Parameters
    ----------
    q : array (Tq, Hq, D)
        Every sequence's query rows, one after another (token-major, as a
        projection's output ``(T, Hq * D)`` reshaped; strided views, e.g.
        the query columns of a fused QKV projection, are read in place).
    k : array (Tk, Hkv, D)
    v : array (Tk, Hkv, Dv)
        ``Hq`` a multiple of ``Hkv`` (grouped-query attention).
    cu_seqlens_q : int array (n + 1,)
        Offsets of the sequences in ``q``: 0, then each end.
    cu_seqlens_k : int array (n + 1,), optional
        Offsets in ``k``/``v``; default ``cu_seqlens_q`` (self-attention).
    is_causal, window, causal_alignment, scale
        As in ``scaled_dot_product_attention``, applied within each
        sequence (bottom-right: the last query of a sequence sees its last key).
    out : array (Tq, Hq, Dv), optional
        Preallocated output of the inputs' dtype.
    compute_dtype : None or "bfloat16"
        As in ``scaled_dot_product_attention``.

    Returns
    -------
    array (Tq, Hq, Dv), the inputs' dtype. A sequence with no keys gives zeros.
    """
    qa, ka, va = as_input(q, "q"), as_input(k, "k"), as_input(v, "v")
    for name, a, want in (("q", qa, "(Tq, Hq, D)"), ("k", ka, "(Tk, Hkv, D)"),
                          ("v", va, "(Tk, Hkv, Dv)")):
        if a.ndim != 3:
            raise ShapeError(f"{name}: expected packed rows {want}, got shape {shape_str(a.shape)}")
    if not (qa.dtype == ka.dtype == va.dtype):
        raise DTypeError(f"q, k and v must share one dtype; got q {qa.dtype}, k {ka.dtype}, "
                         f"v {va.dtype}")
    if ka.shape[:2] != va.shape[:2]:
        raise ShapeError(f"k and v must agree on rows and heads: k {shape_str(ka.shape)}, "
                         f"v {shape_str(va.shape)}")
    if qa.shape[2] != ka.shape[2]:
        raise ShapeError(f"q and k must share the head size D (last axis): q "
                         f"{shape_str(qa.shape)}, k {shape_str(ka.shape)}")
    hq, hkv = qa.shape[1], ka.shape[1]
    if hkv == 0 and hq != 0 or hkv != 0 and hq % hkv != 0:
        raise ShapeError(f"q has {hq} heads and k/v have {hkv}: the query heads must be a "
                         "whole multiple of the key/value heads")
    left, right = window_bounds(window, is_causal)
    top_left = top_left_alignment(causal_alignment)
    scale_v = scale_value(scale, qa.shape[2])
    cu_q = _offsets(cu_seqlens_q, qa.shape[0], "cu_seqlens_q", "q")
    if cu_seqlens_k is None:
        if ka.shape[0] != qa.shape[0]:
            raise ShapeError(f"cu_seqlens_k: needed when k has other rows than q (q "
                             f"{shape_str(qa.shape)}, k {shape_str(ka.shape)})")
        cu_k = cu_q
    else:
        cu_k = _offsets(cu_seqlens_k, ka.shape[0], "cu_seqlens_k", "k")
        if cu_k.shape != cu_q.shape:
            raise ShapeError(f"cu_seqlens_k: expected {cu_q.shape[0]} offsets like "
                             f"cu_seqlens_q, got {cu_k.shape[0]}")
    in_dtype = qa.dtype
    dtype = in_dtype if in_dtype in NATIVE else np.dtype(np.float32)
    bf16 = bf16_products(compute_dtype, dtype)
    out_shape = (qa.shape[0], hq, va.shape[2])
    if out is not None:
        out = check_out(out, out_shape, in_dtype)
    q4, k4, v4 = (kernel_array(a, dtype).transpose(1, 0, 2)[np.newaxis] for a in (qa, ka, va))
    direct = out is not None and kernel_can_write(out, dtype, (qa, ka, va))
    result = out if direct and out is not None else np.empty(out_shape, dtype)
    options = _core.AttentionOptions(scale=scale_v, window_left=left, window_right=right,
                                     top_left=top_left, bf16=bf16)
    _core.attention_varlen(q4, k4, v4, result.transpose(1, 0, 2)[np.newaxis], cu_q, cu_k,
                           options)
    if out is not None:
        if not direct:
            out[...] = result
        return out
    return result if result.dtype == in_dtype else result.astype(in_dtype)
