"""Fuzz target: rope, against the float64 rotation of harness.rope_oracle,
over drawn shapes, dtypes, layouts, theta, seq_dim and offset."""

from __future__ import annotations

import math

import numpy as np
import tileattn
from hypothesis import strategies as st
from tileattn import DTypeError, InvalidParameterError, ShapeError

from .harness import (BAD, LAYOUTS, Expect, Fail, check_unmodified, fresh, laid_out,
                      must_have_raised, rope_oracle, run_expecting, snapshot, start_case)


@st.composite
def rope_cases(draw):
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "shape": draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 8]), min_size=0, max_size=5)),
        "dtype": draw(st.sampled_from(["float32", "float64", "float16", "int64", "complex128",
                                       "bool"])),
        "layout": draw(st.sampled_from(LAYOUTS)),
        "theta": draw(st.one_of(st.just(10000.0), st.floats(0.5, 1e6),
                                st.sampled_from([0.0, -1.0, float("nan"), float("inf"), "1e4",
                                                 True, np.float32(500.0), 10]))),
        "seq_dim": draw(st.one_of(st.just(-2), st.integers(-7, 6),
                                  st.sampled_from([1.0, "0", True, None]))),
        "offset": draw(st.one_of(st.just(0), st.integers(0, 10**5),
                                 st.sampled_from([-1, 2**63, 10**12, 1.5, "3", True,
                                                  np.int64(4)]))),
        "nan": draw(st.booleans()),
    }


def target_rope(c):
    start_case(c)
    rng = np.random.default_rng(c["seed"])
    shape = tuple(c["shape"])
    dt = np.dtype(c["dtype"])
    x = fresh(rng, shape, dt)
    if c["nan"] and x.size and dt.kind == "f":
        x.flat[0] = np.nan
    xin = laid_out(x, c["layout"]) if x.ndim else x
    e = Expect()
    seen = np.asarray(xin)  # what the caller passed, as NumPy reads it (a list: float64)
    if seen.dtype.kind != "f":
        e.add(BAD, "x", (DTypeError,))
    if seen.ndim < 2:
        e.add(BAD, "x", (ShapeError,))
    elif seen.shape[-1] % 2:
        e.add(BAD, "x", (InvalidParameterError,))
    sd = c["seq_dim"]
    nd = seen.ndim
    if isinstance(sd, bool) or not isinstance(sd, int) or nd < 2 or \
            not (-nd <= sd < nd) or sd % nd == nd - 1:
        e.add(BAD, "seq_dim", (InvalidParameterError,))
    th = c["theta"]
    if isinstance(th, (bool, str)) or not (math.isfinite(float(th)) and float(th) > 0):
        e.add(BAD, "theta", (InvalidParameterError,))
    off = c["offset"]
    if isinstance(off, (bool, float, str)) or int(off) < 0:
        e.add(BAD, "offset", (InvalidParameterError,))
    snap = snapshot([xin])
    ok, y = run_expecting(e, lambda: tileattn.rope(xin, theta=th, seq_dim=sd, offset=off))
    if not ok:
        return
    must_have_raised(e)
    check_unmodified(snap)
    xv = np.asarray(xin)
    if y.shape != xv.shape or y.dtype != xv.dtype:
        raise Fail(f"rope returned {y.shape} {y.dtype} for {xv.shape} {xv.dtype}")
    if int(off) > 10**6:
        if not np.isfinite(y[np.isfinite(xv).all(-1)]).all():
            raise Fail("rope at a huge offset gave non-finite values for finite input")
        return
    want = rope_oracle(xv, float(th), sd % xv.ndim, int(off))
    eps = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}[xv.dtype.type]
    # the angle pos * freq is rounded in float64 either way; a few roundings of |x|
    bound = 8 * eps * (1 + np.abs(xv[..., : xv.shape[-1] // 2]).max(initial=0)
                       + np.abs(xv[..., xv.shape[-1] // 2:]).max(initial=0))
    bound += 4e-16 * (int(off) + xv.shape[sd % xv.ndim]) * np.abs(xv).max(initial=0) \
        if xv.size and np.isfinite(xv).all() else 0
    rows_ok = np.isfinite(xv).all(-1)
    err = np.abs(np.asarray(y, np.float64) - want)[rows_ok]
    if err.size and err.max() > bound:
        raise Fail(f"rope off by {err.max():.3g} > {bound:.3g}")
    if xv.size and not np.isnan(np.asarray(y)[~rows_ok]).any() and (~rows_ok).any():
        raise Fail("a NaN in x did not reach its rotated pair")
