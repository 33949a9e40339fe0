"""The checks of an answer of scaled_dot_product_attention to a fuzz case:
against the float64 oracle of reference.py, per batch item where
key_lengths split the keys, and with NaN/inf inputs by which rows and
columns can see them."""

from __future__ import annotations

import os

import numpy as np
from reference import assert_close_to_reference, attention

from .harness import Fail

# NaN in q, k or the mask must come out of every row that sees it (since the
# kernel fix of 86815a7); TILEATTN_FUZZ_STRICT_NAN=0 relaxes that to "any value".
STRICT_NAN = os.environ.get("TILEATTN_FUZZ_STRICT_NAN", "1") != "0"


def _nonfinite(c):
    return any(m in c["mut"] for m in ("nan", "inf")) or c["mask"] in ("nan", "posinf")


def _kw_for_reference(kw):
    ref = {}
    for name in ("attn_mask", "key_padding_mask", "is_causal", "scale"):
        if name in kw and kw[name] is not None:
            ref[name] = kw[name]
    if "is_causal" in ref:
        ref["is_causal"] = bool(ref["is_causal"])
    w = kw.get("window")
    if w is not None:
        ref["window"] = int(w) if isinstance(w, (int, np.integer)) else tuple(int(x) for x in w)
        if isinstance(ref["window"], int):
            pass
        else:
            ref["window"] = tuple(min(x, 2**40) for x in ref["window"])
    if isinstance(ref.get("window"), int):
        ref["window"] = min(ref["window"], 2**40)
    if "attn_mask" in ref:
        ref["attn_mask"] = np.asarray(ref["attn_mask"])
        if ref["attn_mask"].dtype.kind in "iu":
            ref["attn_mask"] = ref["attn_mask"] != 0   # integer masks: nonzero = may attend
    if kw.get("dropout_p"):
        ref["dropout_p"] = float(kw["dropout_p"])
        ref["seed"] = kw["seed"]
    return ref


def check_sdpa_result(res, inputs, kw, values, c):
    rw = bool(kw.get("return_weights"))
    out, weights = res if rw else (res, None)
    q, k, v = (np.asarray(inputs[n]) for n in ("q", "k", "v"))
    if not isinstance(out, np.ndarray):
        raise Fail(f"output is a {type(out).__name__}")
    if out.dtype != q.dtype:
        raise Fail(f"output dtype {out.dtype} != input dtype {q.dtype}")
    want_shape = q.shape[:-1] + (v.shape[-1],)
    if out.shape != want_shape:
        raise Fail(f"output shape {out.shape}, expected {want_shape}")
    if kw.get("out") is not None and out is not kw["out"]:
        raise Fail("out= given but another array returned")
    if rw and weights.shape != q.shape[:-1] + (k.shape[-2],):
        raise Fail(f"weights shape {weights.shape}")
    ref = _kw_for_reference(kw)
    batched = q.ndim == 4
    q4, k4, v4 = (a if batched else a[None] for a in (q, k, v))
    o4 = out if batched else out[None]
    w4 = None if weights is None else (weights if batched else weights[None])
    lengths = kw.get("key_lengths")
    lengths = None if lengths is None else np.atleast_1d(np.asarray(lengths))
    mask = ref.pop("attn_mask", None)
    kpm = ref.pop("key_padding_mask", None)
    if mask is not None:
        mask = np.broadcast_to(mask, (q4.shape[0], q4.shape[1], q4.shape[2], k4.shape[2])
                               if batched or mask.ndim == 4 else q4.shape[1:3] + k4.shape[2:3])
        if not batched:
            mask = mask[None] if mask.ndim == 3 else mask
    if kpm is not None:
        kpm = np.asarray(kpm).astype(bool)
        kpm = kpm if batched else kpm[None]
    nonfinite = _nonfinite(c) and not all(np.isfinite(a).all() for a in (q4, k4, v4)) \
        or (mask is not None and mask.dtype.kind == "f" and not np.isfinite(
            np.where(np.isneginf(mask), 0, mask)).all())
    dropout = bool(ref.get("dropout_p"))
    if dropout and (ref.get("seed") is None or lengths is not None or _nonfinite(c)):
        # Random masks (no seed), or the oracle's per-item split (key_lengths)
        # changes the flat weight index the dropout hash is keyed on.  A NaN or
        # +inf in q, k, v or a float mask may reach the output; nothing else may.
        if not np.isfinite(out).all() and not nonfinite:
            raise Fail("non-finite output with dropout")
        return
    items = [slice(None)] if lengths is None else [slice(i, i + 1) for i in range(q4.shape[0])]
    for bi in items:
        n = k4.shape[2] if lengths is None else int(lengths[bi][0])
        qb, kb, vb = q4[bi], k4[bi, :, :n], v4[bi, :, :n]
        kwb = dict(ref)
        if mask is not None:
            mb = np.broadcast_to(mask, q4.shape[:3] + (k4.shape[2],))[bi]
            kwb["attn_mask"] = mb[..., :n]
        if kpm is not None:
            kwb["key_padding_mask"] = kpm[bi, :n]
        got = o4[bi]
        if nonfinite:
            check_nonfinite(got, qb, kb, vb, kwb)
            continue
        if not np.isfinite(got).all():
            raise Fail(f"non-finite output for finite input (batch items {bi})")
        gw = None if w4 is None else w4[bi][..., :n]
        if gw is not None and n < k4.shape[2] and w4[bi][..., n:].any():
            raise Fail("non-zero weights past key_lengths")
        assert_close_to_reference(got, qb, kb, vb, weights=gw, logit_roundings=2, **kwb)


def check_nonfinite(got, q, k, v, kw):
    """NaN/inf inputs: rows that can see no non-finite value match the oracle
    on the same inputs; a NaN that a row does see must come out as NaN."""
    kw = dict(kw)
    kw.pop("dropout_p", None)
    kw.pop("seed", None)
    mask = kw.get("attn_mask")
    lq, lk = q.shape[2], k.shape[2]
    _, w = attention(np.zeros_like(q, dtype=np.float64), np.zeros_like(k, dtype=np.float64),
                     np.zeros_like(v, dtype=np.float64),
                     **{n: x for n, x in kw.items() if n not in ("attn_mask", "scale")},
                     attn_mask=None if mask is None or mask.dtype != bool else mask)
    vis = w > 0  # (1, Hq, Lq, Lk): keys each row may see (bool masks, padding, causal, window)
    fblock = np.zeros_like(vis)
    fbad = np.zeros_like(vis)
    fnan = np.zeros_like(vis)
    if mask is not None and mask.dtype.kind == "f":
        mb = np.broadcast_to(mask, vis.shape)
        fblock = np.isneginf(mb)
        fbad = np.isposinf(mb)
        fnan = np.isnan(mb)
    group = q.shape[1] // max(k.shape[1], 1)
    kf, vf = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    q_nan = np.isnan(q).any(-1)[..., :, None]             # (1, Hq, Lq, 1)
    q_inf = np.isinf(q).any(-1)[..., :, None]
    k_nan = np.isnan(kf).any(-1)[..., None, :]            # (1, Hq, 1, Lk)
    k_inf = np.isinf(kf).any(-1)[..., None, :]
    open_ = vis & ~fblock
    row_nan = (open_ & (q_nan | k_nan | fnan)).any(-1)    # must be NaN (whole row)
    row_any = (vis & (q_inf | k_inf | fbad | (fblock & (q_nan | k_nan)))).any(-1)
    v_bad = ~np.isfinite(vf)                              # (1, Hq, Lk, Dv)
    # The oracle on inputs with the bad values zeroed: the clean rows' values,
    # and the weights that tell a key whose float32 weight may underflow to
    # exactly 0 (it then adds nothing, even a NaN value: README, Masks).
    qz, kz, vz = (np.where(np.isfinite(a), a, 0).astype(a.dtype) for a in (q, k, v))
    kwz = dict(kw)
    if mask is not None and mask.dtype.kind == "f":
        kwz["attn_mask"] = np.where(np.isnan(mask) | np.isposinf(mask), 0, mask).astype(mask.dtype)
    want, w_want = attention(qz, kz, vz, **kwz)
    tiny = w_want < 2.0**-90                              # may be 0 in float32
    col_nonfinite = np.einsum("bhij,bhjc->bhic", (open_ & ~tiny).astype(np.int64),
                              v_bad.astype(np.int64)) > 0
    col_any = np.einsum("bhij,bhjc->bhic", ((vis & fblock) | (open_ & tiny)).astype(np.int64),
                        v_bad.astype(np.int64)) > 0
    must_nan = np.broadcast_to(row_nan[..., None], got.shape)
    anything = np.broadcast_to(row_any[..., None], got.shape) | col_any
    must_nonfinite = col_nonfinite & ~anything
    clean = ~(must_nan | anything | must_nonfinite)
    if not STRICT_NAN:
        anything = anything | must_nan
    g = np.asarray(got, np.float64)
    if STRICT_NAN and (must_nan & ~anything & ~np.isnan(g)).any():
        raise Fail("a row that sees a NaN does not output NaN")
    if (must_nonfinite & ~must_nan & np.isfinite(g)).any():
        raise Fail("a column that sees an inf/NaN value is finite")
    # the clean rows against the oracle on inputs with the bad values zeroed
    if not np.isfinite(g[clean]).all():
        raise Fail("a row that sees no NaN/inf outputs a non-finite value")
    patched = np.where(clean, g, want).astype(got.dtype)
    assert_close_to_reference(patched, qz, kz, vz, logit_roundings=2, **kwz)
