"""Fuzz target: sinusoidal_positions, against the table computed column by
column in float64, over drawn lengths, dims, bases and dtypes."""

from __future__ import annotations

import math

import numpy as np
import tileattn
from hypothesis import strategies as st
from tileattn import DTypeError, InvalidParameterError

from .harness import BAD, HUGE, Expect, Fail, must_have_raised, run_expecting, start_case

sinus_cases = st.fixed_dictionaries({
    "length": st.one_of(st.integers(0, 300), st.sampled_from(
        [-1, 10**12, 2**63, 1.0, "5", True, None, np.int64(7)])),
    "dim": st.one_of(st.integers(1, 65), st.sampled_from(
        [0, -4, 10**12, 2**70, 2.0, "8", False, np.uint16(6)])),
    "base": st.one_of(st.just(None), st.floats(1.5, 1e5),
                      st.sampled_from([0.0, -5.0, float("nan"), float("inf"), "x", True])),
    "dtype": st.sampled_from([None, "float32", "float64", "float16", "int32", "complex64",
                              "nonsense"]),
})


def target_sinusoidal(c):
    start_case(c)
    e = Expect()
    n, d, base, dtype = c["length"], c["dim"], c["base"], c["dtype"]

    def int_ok(x, lo):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and int(x) >= lo
    if not int_ok(n, 0):
        e.add(BAD, "length", (InvalidParameterError,))
    if not int_ok(d, 1):
        e.add(BAD, "dim", (InvalidParameterError,))
    if base is not None and (isinstance(base, (bool, str)) or not (
            math.isfinite(base) and base > 0)):
        e.add(BAD, "base", (InvalidParameterError,))
    if dtype is not None and dtype not in ("float32", "float64", "float16"):
        e.add(BAD, "dtype", (DTypeError,))
    huge = int_ok(n, 0) and int_ok(d, 1) and int(n) * int(d) > 10**9
    if int_ok(n, 0) and int_ok(d, 1) and max(int(n), int(d)) > 10**9:
        e.add(HUGE, {"length", "dim"})
    kw = {}
    if base is not None:
        kw["base"] = base
    if dtype is not None:
        kw["dtype"] = dtype
    ok, p = run_expecting(e, lambda: tileattn.sinusoidal_positions(n, d, **kw))
    if not ok:
        return
    must_have_raised(e)
    if huge:
        raise Fail("a > 1e9-element table was returned")
    b = 10000.0 if base is None else float(base)
    n, d = int(n), int(d)
    pos = np.arange(n, dtype=np.float64)[:, None]
    want = np.empty((n, d))
    for col in range(d):
        ang = pos[:, 0] / b ** ((col - col % 2) / d)
        want[:, col] = np.sin(ang) if col % 2 == 0 else np.cos(ang)
    if p.shape != (n, d) or p.dtype != np.dtype(dtype or "float32"):
        raise Fail(f"table {p.shape} {p.dtype}")
    tol = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-12}[p.dtype.type] + 1e-15 * n
    if n and np.abs(p.astype(np.float64) - want).max() > tol:
        raise Fail(f"table off by {np.abs(p - want).max():.3g}")
