"""Fuzz target: set_num_threads. Any count from 1 to 4096 is taken and gives
the same bits as one thread; anything else is refused and leaves the pool."""

from __future__ import annotations

import numpy as np
import tileattn
from hypothesis import strategies as st
from tileattn import InvalidParameterError

from .harness import BAD, OK, Expect, Fail, must_have_raised, run_expecting, start_case

threads_cases = st.fixed_dictionaries({
    "n": st.one_of(st.integers(-5, 9), st.sampled_from(
        [0, 4096, 4097, 10**6, 2**31, 2**63, -(2**63), 2**100, np.int64(3), np.uint8(2),
         np.int64(-1), 2.0, 2.5, float("nan"), "2", None, True, False, np.True_, [2], 2j])),
    "seed": st.integers(0, 2**16)})


def target_threads(c):
    n = c["n"]
    start_case(c)
    e = Expect()
    valid = isinstance(n, (int, np.integer)) and not isinstance(n, (bool, np.bool_)) \
        and 1 <= int(n) <= 4096
    e.add(OK if valid else BAD, {"set_num_threads", "n"}, (InvalidParameterError,))
    before = tileattn.get_num_threads()
    ok, _ = run_expecting(e, lambda: tileattn.set_num_threads(n))
    try:
        if not ok:
            if tileattn.get_num_threads() != before:
                raise Fail("a refused thread count changed the pool")
            return
        must_have_raised(e)
        if tileattn.get_num_threads() != int(n):
            raise Fail(f"get_num_threads() = {tileattn.get_num_threads()} after set {n}")
        rng = np.random.default_rng(c["seed"])
        q = rng.standard_normal((1, 2, 100, 16)).astype(np.float32)
        got = tileattn.scaled_dot_product_attention(q, q, q, is_causal=True)
        tileattn.set_num_threads(1)
        one_thread = tileattn.scaled_dot_product_attention(q, q, q, is_causal=True)
        if not np.array_equal(got, one_thread):
            raise Fail(f"{n} threads give other bits than 1 thread")
    finally:
        tileattn.set_num_threads(before)
