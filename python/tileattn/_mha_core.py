"""MultiHeadAttention's heads through tileattn's core: the (B, L, H, D)
arrays the projections give, as the (B, H, L, D) views the core takes, in
the forward and the backward."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _call
from ._call_checks import check_out
from ._errors import ShapeError
from ._validate import shape_str
from ._mha_saved import AttentionSaved, CoreSaved

Heads = Tuple[np.ndarray, np.ndarray, np.ndarray]


def heads_first(a: np.ndarray, unbatched: bool = False) -> np.ndarray:
    """(B, L, H, D) -> the (B, H, L, D) view the core takes ((H, L, D) unbatched)."""
    a = a.transpose(0, 2, 1, 3)
    return a[0] if unbatched else a


def refuse_ambiguous_mask(attn_mask: Any, b: int, hq: int, lq: int, lk: int) -> None:
    """A module's batched call refuses a 3-D ``attn_mask``: NumPy broadcasting
    reads it as (heads, Lq, Lk), Keras as (B, Lq, Lk) and PyTorch as
    (B*heads, Lq, Lk), and with B == heads a Keras mask would silently give
    another function. 2-D and 4-D masks mean one thing to all three."""
    if attn_mask is None or np.ndim(attn_mask) != 3:
        return
    raise ShapeError(
        f"attn_mask: a 3-D mask {shape_str(np.shape(attn_mask))} is ambiguous: NumPy "
        f"broadcasting reads it as (heads, Lq, Lk), Keras as (B, Lq, Lk) and PyTorch as "
        f"(B*heads, Lq, Lk). Pass (Lq, Lk) or (B, Hq, Lq, Lk) = ({b}, {hq}, {lq}, {lk}): "
        f"mask[:, None] for a per-batch (B, Lq, Lk) mask, "
        f"mask.reshape({b}, {hq}, {lq}, {lk}) for PyTorch's (B*heads, Lq, Lk), "
        f"mask[None] for a per-head (heads, Lq, Lk) mask")


def attend_heads(q: np.ndarray, k: np.ndarray, v: np.ndarray, unbatched: bool, value_dim: int,
                 *, dropout: Tuple[float, Optional[int]], need_weights: bool, training: bool,
                 masks: Dict[str, Any], compute_dtype: Optional[str] = None
                 ) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[CoreSaved]]:
    """The core on (B, H, L, D) views of q (B, Lq, Hq, D), k, v; the output
    lands in a (B, Lq, Hq*Dv) buffer ready for out_proj (no transposing
    copy). Returns it, the weights (with need_weights) and, in training,
    what the core's backward takes. ``dropout`` is (rate, seed);
    ``compute_dtype`` the module's ("bfloat16" or None)."""
    b, lq, hq, _ = q.shape
    buf = np.empty((b, lq, hq, value_dim), q.dtype)
    p, seed = dropout
    # Unbatched inputs go to the core unbatched, so that its mask rules
    # (and error messages) are the ones the user's shapes call for.
    qh, kh, vh, out = (heads_first(a, unbatched) for a in (q, k, v, buf))
    # The call is described (checked) once; a training forward keeps it for
    # the backward, which then checks nothing again.
    call = _call.describe(qh, kh, vh, dropout_p=p, seed=seed, compute_dtype=compute_dtype,
                          **masks)
    res = _call.forward(call, out=check_out(out, call.inputs.out_shape, call.inputs.in_dtype),
                        return_weights=need_weights, return_lse=training)
    w = res[1] if need_weights else None
    if w is not None and unbatched:
        w = w[None]
    core = CoreSaved(qh, kh, vh, out, res[-1], call) if training else None
    return buf.reshape(b, lq, hq * value_dim), w, core


def core_backward(s: AttentionSaved, d_attn: np.ndarray) -> Heads:
    """dL/d(attention output) (B', Lq, Hq*Dv) -> dq (B', Lq, Hq, D),
    dk (B', Lk, Hkv, D), dv (B', Lk, Hkv, Dv) by the fused core backward."""
    c = s.core
    assert c is not None
    b, lq = d_attn.shape[:2]
    (hq, d), (hkv, lk), dv_ = c.q.shape[-3::2], c.k.shape[-3:-1], c.v.shape[-1]
    dq = np.empty((b, lq, hq, d), d_attn.dtype)
    dk = np.empty((b, lk, hkv, d), d_attn.dtype)
    dv = np.empty((b, lk, hkv, dv_), d_attn.dtype)
    u = s.unbatched
    dout = heads_first(d_attn.reshape(b, lq, hq, dv_), u)
    _call.backward(c.call, dout, c.out, c.lse,
                   grads_out=(heads_first(dq, u), heads_first(dk, u), heads_first(dv, u)))
    return dq, dk, dv
