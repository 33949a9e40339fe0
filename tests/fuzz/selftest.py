"""Self-tests of the harness: a crash and an untyped error must be caught
(tests/test_fuzz.py checks that the parent reports each with its case)."""

from __future__ import annotations

from hypothesis import strategies as st

from .harness import Expect, run_expecting, start_case

crash_cases = st.fixed_dictionaries({"n": st.integers(0, 5)})
untyped_cases = st.fixed_dictionaries({"n": st.just(0)})


def target_selftest_crash(c):
    start_case(c)
    if c["n"] == 3:
        import ctypes
        ctypes.string_at(0)  # SIGSEGV


def target_selftest_untyped(c):
    start_case(c)
    run_expecting(Expect(), lambda: int("not a number"))
