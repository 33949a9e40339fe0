"""Dense NumPy attention with tileattn's mask rules: the oracle of the tests.

Written from the contract (SPEC.md), independently of the C++ kernel: it
materialises the whole score matrix and computes in the dtype it is given
(float64 for the oracle, float32 for "what a plain NumPy implementation
would get", which sets the error budget).
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def dropout_uniform(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """The uniform numbers the dropout of weight (b, h, i, j) is decided by:
    splitmix64 of the seed, then of stream + flat_index * golden."""
    with np.errstate(over="ignore"):
        stream = _mix64(np.array([seed], dtype=np.uint64) ^ _GOLDEN)
        idx = np.arange(int(np.prod(shape)), dtype=np.uint64).reshape(shape)
        bits = _mix64(stream + idx * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def visible_keys(lq: int, lk: int, is_causal=False, window=None,
                 causal_alignment="bottom_right") -> np.ndarray:
    """(Lq, Lk) bool: which keys each query may see from causal/window alone
    (query i aligned at key i + Lk - Lq bottom-right, at key i top-left)."""
    left, right = -1, -1
    if window is not None:
        if isinstance(window, int):
            left, right = window - 1, 0
        else:
            left, right = window
    if is_causal:
        right = 0 if right == -1 else min(right, 0)
    i = np.arange(lq)[:, None] + (0 if causal_alignment == "top_left" else lk - lq)
    j = np.arange(lk)[None, :]
    ok = np.ones((lq, lk), dtype=bool)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def attention(q, k, v, *, attn_mask=None, key_padding_mask=None, is_causal=False,
              window=None, causal_alignment="bottom_right", scale=None, dropout_p=0.0, seed=0,
              dtype=np.float64):
    """Returns (out, weights) computed densely in `dtype`.

    Shapes as tileattn (batched or unbatched); weights are after dropout.
    """
    batched = np.ndim(q) == 4
    q, k, v = (np.asarray(a).astype(dtype) for a in (q, k, v))
    if not batched:
        q, k, v = q[None], k[None], v[None]
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv if hkv else 1
    k = np.repeat(k, group, axis=1)
    v = np.repeat(v, group, axis=1)
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d else 1.0
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * dtype(scale)
    ok = np.broadcast_to(visible_keys(lq, lk, is_causal, window, causal_alignment),
                         s.shape).copy()
    if attn_mask is not None:
        m = np.asarray(attn_mask)
        if not batched:
            m = np.broadcast_to(m, s.shape[1:])[None]
        if m.dtype == bool:
            ok &= np.broadcast_to(m, s.shape)
        else:
            s = s + np.broadcast_to(m.astype(dtype), s.shape)
    if key_padding_mask is not None:
        kpm = np.asarray(key_padding_mask).astype(bool)
        if not batched:
            kpm = kpm[None]
        ok &= np.broadcast_to(kpm, (b, lk))[:, None, None, :]
    s = np.where(ok, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if lk else np.zeros(s.shape[:-1] + (1,), dtype)
    m = np.where(np.isfinite(m), m, 0)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(s - m)
        p = np.where(ok, p, 0)
        l = p.sum(axis=-1, keepdims=True)
        w = np.where(l > 0, p / np.where(l > 0, l, 1), 0).astype(dtype)
    if dropout_p > 0:
        u = dropout_uniform(seed, w.shape)
        keep = u >= dropout_p
        w = np.where(keep, w * dtype(1.0 / (1.0 - dropout_p)) if dropout_p < 1 else 0, 0)
        w = w.astype(dtype)
    out = np.matmul(w, v)
    if not batched:
        out, w = out[0], w[0]
    return out, w


EPS = {np.dtype(np.float16): 2.0**-11, np.dtype(np.float32): 2.0**-24,
       np.dtype(np.float64): 2.0**-53}


def _errors(a, b) -> tuple[float, float]:
    """(max abs, root-mean-square) distance of a from the oracle b."""
    if not np.size(b):
        return 0.0, 0.0
    diff = np.abs(np.asarray(a, np.float64) - b)
    return float(diff.max()), float(np.sqrt(np.mean(diff**2)))


def _check(name, got, oracle, plain, scale, extra=0.0):
    """The tolerance rule of the test suite, for one result array.

    float32 (and float16, computed in float32): the distance from the float64
    oracle may be at most twice that of a plain NumPy implementation computed
    in float32 (rounded to the output dtype), plus two roundings at the
    output's scale so that a case the plain method happens to get exactly
    is not asked for exactly zero error: a flash-style kernel rounds the
    sum of p_j v_j and then the division by l, each at the output's scale
    (e.g. three equal keys: fl(fl(3v) / 3) can be 1 ulp from v, where NumPy's
    weights 1/3 happen to give v exactly; a fuzz case found it). "Distance" is the root-mean-square error: the max-abs error
    of two equally accurate methods differs by up to ~2.3x from data alone
    (measured: median ratio 1.0, RMS ratio 1.05-1.15), so it cannot carry a
    2x rule. The max-abs error is still checked, at 4x, to catch a bug that
    corrupts a few elements only (e.g. at a tile edge).
    float64: within 64 roundings at the output's scale, element by element.
    extra: a further allowance (see logit_sensitivity), added to either rule.
    """
    dt = np.asarray(got).dtype
    err_max, err_rms = _errors(got, oracle)
    if dt == np.float64:
        budget = 64 * EPS[dt] * max(scale, 1.0) + extra
        assert err_max <= budget, f"{name}: max error {err_max:.3g} exceeds {budget:.3g}"
        return err_max
    plain_max, plain_rms = _errors(np.asarray(plain).astype(dt), oracle)
    floor = 2 * EPS[dt] * scale + extra
    assert err_rms <= 2.0 * plain_rms + floor, (
        f"{name}: RMS error {err_rms:.3g} > 2 x plain NumPy's {plain_rms:.3g} + {floor:.3g}")
    assert err_max <= 4.0 * plain_max + floor, (
        f"{name}: max error {err_max:.3g} > 4 x plain NumPy's {plain_max:.3g} + {floor:.3g}")
    return err_max


def logit_sensitivity(q, k, v, w, *, scale=None, attn_mask=None, **_):
    """How far one rounding of every logit may move the results, per EPS:
    (output, weights). A logit s_ij = scale q_i . k_j (+ mask) is rounded at
    the magnitude a_ij = |scale| sum_d |q_id k_jd| (+ |mask_ij|); moving
    every logit by d_ij moves output row i by sum_j p_ij d_ij (v_j - o_i) and
    weight ij by p_ij (d_ij - sum_k p_ik d_ik). With |d_ij| <= EPS a_ij these
    bound the error any method that rounds its logits once must allow. Small
    for ordinary scales; large where big logits nearly tie (scale 26 at
    D = 33: logits near 500, so one rounding is ~3e-5 of a logit and can
    swap which of two keys wins by that much). w: the float64 weights."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if q.ndim == 3:
        q, k, v, w = q[None], k[None], v[None], w[None]
    group = q.shape[1] // k.shape[1] if k.shape[1] else 1
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(d) if d else 1.0
    a = abs(scale) * np.matmul(np.abs(q), np.swapaxes(np.abs(k), -1, -2))
    if attn_mask is not None and np.asarray(attn_mask).dtype.kind == "f":
        m = np.abs(np.asarray(attn_mask, np.float64))
        a = a + np.broadcast_to(np.where(np.isfinite(m), m, 0), a.shape)
    w = np.where(np.isfinite(w), w, 0)
    o = np.matmul(w, v)
    spread = np.abs(v[..., None, :, :] - o[..., :, None, :]).max(-1, initial=0.0)
    out_s = float((w * a * spread).sum(-1).max(initial=0.0))
    row = (w * a).sum(-1, keepdims=True)
    weights_s = float((w * (a + row)).max(initial=0.0))
    return out_s, weights_s


def assert_close_to_reference(got, q, k, v, *, weights=None, logit_roundings=0.0, **kw):
    """Check tileattn's output (and weights) against the float64 oracle with
    the rule of `_check`; kw are the attention options. logit_roundings > 0
    also allows that many roundings of every logit (logit_sensitivity), for
    callers whose scales run far beyond 1/sqrt(D), e.g. the fuzz targets:
    there two equally good float32 methods can differ 20-fold from the data
    alone, so the plain method's error cannot set the budget by itself."""
    want, want_w = attention(q, k, v, **kw)
    plain, plain_w = attention(q, k, v, dtype=np.float32, **kw)
    assert got.shape == want.shape, (got.shape, want.shape)
    # The output's scale: a convex combination of v's rows, times the dropout
    # keep factor 1 / (1 - p) (as for the weights below).
    p = kw.get("dropout_p", 0.0)
    keep = 1.0 / (1.0 - p) if p < 1 else 1.0
    vscale = float(np.max(np.abs(v))) if np.size(v) else 1.0
    extra = (0.0, 0.0)
    if logit_roundings and np.size(want_w):
        eps = EPS[np.promote_types(np.asarray(got).dtype, np.float32)]  # float16 computes in float32
        extra = tuple(logit_roundings * eps * x for x in logit_sensitivity(q, k, v, want_w, **kw))
    err = _check("output", got, want, plain, vscale * keep, extra[0])
    if weights is not None:
        assert weights.shape == want_w.shape, (weights.shape, want_w.shape)
        _check("weights", weights, want_w, plain_w, keep, extra[1])
    return err
