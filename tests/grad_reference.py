"""Dense NumPy attention backward with tileattn's mask rules: the oracle of
the gradient tests.

Written from the textbook softmax backward, independently of the C++
kernel: it builds the whole (Lq, Lk) weight matrix with reference.attention
and computes in the dtype it is given. The oracle runs in np.longdouble
(80-bit extended on x86-64), so that float64 results have an oracle more
precise than themselves. The tolerances are the suite's (reference._check):
float32 at most twice as far from the oracle as a plain float32 NumPy
computation; float64 within 64 roundings.
"""

from __future__ import annotations

import numpy as np

from reference import attention, dropout_uniform

# Whether np.longdouble carries more precision than float64 here.
EXTENDED = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps
ORACLE = np.longdouble if EXTENDED else np.float64


def attention_grads(dout, q, k, v, *, dtype=ORACLE, attn_mask=None, dropout_p=0.0, seed=0,
                    scale=None, **kw):
    """(out, dq, dk, dv, dscores, magnitudes) computed densely in `dtype`,
    batched 4-D inputs; dscores is dL/d(scores) in (B, Hq, Lq, Lk), the
    gradient of an additive mask before it is summed over broadcast axes.
    magnitudes holds, for dq, dk, dv and dscores, the sums of the absolute
    values of the terms each element adds up: the scale one rounding error
    is measured at (the result itself may cancel to ~0)."""
    q, k, v, dout = (np.asarray(a).astype(dtype) for a in (q, k, v, dout))
    if attn_mask is not None and np.asarray(attn_mask).dtype != bool:
        attn_mask = np.asarray(attn_mask).astype(dtype)
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    sc = dtype(scale)
    _, p = attention(q, k, v, attn_mask=attn_mask, scale=scale, dtype=dtype, **kw)
    if dropout_p > 0:
        keep = dropout_uniform(seed, p.shape) >= dropout_p
        factor = dtype(1.0 / (1.0 - dropout_p)) if dropout_p < 1 else dtype(0)
        drop = np.where(keep, factor, dtype(0)).astype(dtype)
    else:
        drop = np.ones((), dtype)
    pd = p * drop
    kr = np.repeat(k, group, axis=1)
    vr = np.repeat(v, group, axis=1)
    out = pd @ vr
    dvr = np.swapaxes(pd, -1, -2) @ dout
    dpd = dout @ np.swapaxes(vr, -1, -2)
    dp = dpd * drop
    # D_i = dO_i . O_i, which equals rowsum(P * dP): the form a blocked
    # backward has to use (it never holds a whole row of P), so the plain
    # computation has the rounding structure of the method under test.
    rowdot = (dout * out).sum(axis=-1, keepdims=True)
    ds = p * (dp - rowdot)
    dq = (ds @ kr) * sc
    dkr = (np.swapaxes(ds, -1, -2) @ q) * sc
    dk = dkr.reshape(b, hkv, group, *dkr.shape[2:]).sum(axis=2)
    dv = dvr.reshape(b, hkv, group, *dvr.shape[2:]).sum(axis=2)
    # |dP| and |D| as sums of absolute terms: dP_ij = dO_i . V_j (times the
    # dropout factor), D_i = dO_i . O_i.
    dp_abs = (np.abs(dout) @ np.swapaxes(np.abs(vr), -1, -2)) * np.abs(drop)
    rowdot_abs = (np.abs(dout) * np.abs(out)).sum(axis=-1, keepdims=True)
    ds_abs = p * (dp_abs + rowdot_abs)
    dk_abs = (np.swapaxes(ds_abs, -1, -2) @ np.abs(q)) * abs(sc)
    dv_abs = np.swapaxes(np.abs(pd), -1, -2) @ np.abs(dout)
    mags = ((ds_abs @ np.abs(kr)) * abs(sc),
            dk_abs.reshape(b, hkv, group, *dk_abs.shape[2:]).sum(axis=2),
            dv_abs.reshape(b, hkv, group, *dv_abs.shape[2:]).sum(axis=2),
            ds_abs)
    return out, dq, dk, dv, ds, mags


def _errors(a, b):
    if not np.size(b):
        return 0.0, 0.0
    diff = np.abs(np.asarray(a).astype(ORACLE) - b)
    return float(diff.max()), float(np.sqrt(np.mean(diff**2)))


def check_grad(name, got, oracle, plain, magnitude=None):
    """The suite's tolerance rule (reference._check) for one gradient.
    float32: RMS distance from the oracle at most 2x that of the plain
    computation (max-abs at 4x), plus one rounding at the scale of the
    computation, so that a case the plain
    computation gets exactly (e.g. dq = 0 when each query sees one key: its
    terms cancel exactly there) is not asked for exactly zero error.
    `magnitude` is that scale per element (the sum of the absolute values of
    the terms added up); the gradient's own size when not given.
    float64: within 64 roundings at that scale, element by element (against
    the long double oracle where there is one)."""
    got = np.asarray(got)
    assert got.shape == oracle.shape, (name, got.shape, oracle.shape)
    assert np.isfinite(got).all(), f"{name}: not finite"
    eps = np.finfo(got.dtype).eps / 2
    ref = np.abs(oracle) if magnitude is None else np.maximum(np.abs(oracle), magnitude)
    scale = float(np.max(ref)) if np.size(ref) else 1.0
    floor = eps * max(scale, 1e-30)
    err_max, err_rms = _errors(got, oracle)
    if got.dtype == np.float64:
        # reference._check's float64 rule: 64 roundings, element by element.
        budget = 64 * eps * max(scale, 1.0)
        assert err_max <= budget, f"{name}: max error {err_max:.3g} exceeds {budget:.3g}"
        return
    plain_max, plain_rms = _errors(np.asarray(plain).astype(got.dtype), oracle)
    assert err_rms <= 2.0 * plain_rms + floor, (
        f"{name}: RMS error {err_rms:.3g} > 2 x plain NumPy's {plain_rms:.3g} + {floor:.3g}")
    assert err_max <= 4.0 * plain_max + floor, (
        f"{name}: max error {err_max:.3g} > 4 x plain NumPy's {plain_max:.3g} + {floor:.3g}")


def assert_grads_close(grads, dout, q, k, v, **kw):
    """Checks (dq, dk, dv) from tileattn against the oracle; kw are the
    attention options (batched inputs)."""
    oracle = attention_grads(dout, q, k, v, **kw)
    plain = attention_grads(dout, q, k, v, dtype=np.asarray(q).dtype.type, **kw)
    for name, g, o, p, mag in zip(("dq", "dk", "dv"), grads, oracle[1:4], plain[1:4], oracle[5]):
        check_grad(name, g, o, p, mag)
    return oracle
