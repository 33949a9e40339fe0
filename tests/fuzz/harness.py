"""The machinery every fuzz target shares: the case log that survives a
crash, the outcome rules (Expect, run_expecting), input snapshots, array
layouts, and the oracles more than one target checks against."""

from __future__ import annotations

import os
import re
import traceback

import numpy as np
from tileattn import DTypeError, InvalidParameterError, ShapeError

TYPED = (ShapeError, DTypeError, InvalidParameterError)


class CaseLog:
    """Writes the current case to a file before it runs (survives a crash)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.count = 0

    def start(self, desc: str) -> None:
        self.count += 1
        data = f"case {self.count}: {desc}\n".encode()
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, data)


# The child's one log, opened by open_case_log; the targets reach it through
# start_case so that they need not be handed it.
_log: CaseLog | None = None


def open_case_log(path: str) -> CaseLog:
    global _log
    _log = CaseLog(path)
    return _log


def start_case(case) -> None:
    """Records `case` (a target's drawn dict) as the one now running."""
    assert _log is not None, "open_case_log first"
    _log.start(repr(case))


class Fail(AssertionError):
    pass


# -- outcome rules ------------------------------------------------------------
OK, BAD, EITHER, HUGE = "ok", "bad", "either", "huge"


class Expect:
    """What a case may do: OK must return the right answer; BAD must raise
    the given typed error(s); EITHER may do either; HUGE may also raise
    MemoryError. ``names``: the arguments the message may name."""

    def __init__(self) -> None:
        self.kind = OK
        self.errors: tuple[type, ...] = TYPED
        self.names: set[str] = set()
        self.allow_memory = False

    def add(self, kind: str, names, errors=TYPED) -> None:
        names = {names} if isinstance(names, str) else set(names)
        self.names |= names
        if kind == HUGE:
            self.allow_memory = True
        rank = {OK: 0, EITHER: 1, HUGE: 2, BAD: 3}
        if rank[kind] > rank[self.kind]:
            self.kind = kind
            if kind == BAD:
                self.errors = errors
        elif kind == BAD and self.kind == BAD:
            self.errors = TYPED  # several faults: any may be reported first


def names_argument(msg: str, names) -> bool:
    return any(re.search(r"(?<![A-Za-z_])" + re.escape(n) + r"(?![A-Za-z_])", msg)
               for n in names)


def run_expecting(expect: Expect, fn):
    """Calls fn(); returns (True, result) or (False, None) after checking a
    raised error against expect. Raises Fail on a contract violation."""
    try:
        return True, fn()
    except TYPED as e:
        if expect.kind == OK:
            raise Fail(f"valid input raised {type(e).__name__}: {e}") from e
        if expect.kind == BAD and not isinstance(e, expect.errors):
            raise Fail(f"expected {[t.__name__ for t in expect.errors]}, got "
                       f"{type(e).__name__}: {e}") from e
        if not names_argument(str(e), expect.names):
            raise Fail(f"{type(e).__name__} message names none of {sorted(expect.names)}: "
                       f"{e}") from e
        return False, None
    except MemoryError as e:
        if not expect.allow_memory:
            raise Fail(f"MemoryError for a case that allocates little: {e}") from e
        return False, None
    except Fail:
        raise
    except Exception as e:
        raise Fail(f"untyped error {type(e).__name__}: {e}\n{traceback.format_exc()}") from e


def must_have_raised(expect: Expect) -> None:
    if expect.kind == BAD:
        raise Fail(f"accepted invalid input (expected {[t.__name__ for t in expect.errors]} "
                   f"naming one of {sorted(expect.names)})")


def snapshot(objs):
    return [(o, o.tobytes(), o.shape, o.strides) for o in objs
            if isinstance(o, np.ndarray) and o.nbytes < 10**8]  # not huge broadcasts


def check_unmodified(snap) -> None:
    for o, data, shape, strides in snap:
        if o.tobytes() != data:
            raise Fail(f"an input {shape} was modified")


# -- array layouts ------------------------------------------------------------
LAYOUTS = ["contiguous", "transposed", "strided", "negative", "readonly", "unaligned",
           "fortran", "broadcast", "list"]


def laid_out(values: np.ndarray, layout: str):
    """values (any dtype) as an array of the same contents in another memory layout."""
    a = values
    if layout == "contiguous" or a.ndim == 0:
        return np.ascontiguousarray(a)
    if layout == "transposed":
        axes = list(range(a.ndim))
        axes[-2:] = axes[-2:][::-1] if a.ndim >= 2 else axes[-2:]
        return np.ascontiguousarray(a.transpose(axes)).transpose(axes)
    if layout == "strided":
        big = np.zeros(tuple(2 * s + 1 for s in a.shape), a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative":
        flipped = np.ascontiguousarray(a[..., ::-1, :] if a.ndim >= 2 else a[::-1])
        return flipped[..., ::-1, :] if a.ndim >= 2 else flipped[::-1]
    if layout == "readonly":
        r = np.array(a)
        r.flags.writeable = False
        return r
    if layout == "unaligned":
        if a.dtype.itemsize == 1 or a.dtype.hasobject:
            return np.array(a)
        raw = np.zeros(a.nbytes + 1, np.uint8)
        u = raw[1:].view(a.dtype).reshape(a.shape)
        u[...] = a
        return u
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "broadcast":
        # a zero-stride view wherever an axis has equal slices
        for ax in range(a.ndim):
            if a.shape[ax] > 1 and (a == a.take([0], axis=ax)).all():
                return np.broadcast_to(a.take([0], axis=ax), a.shape)
        return a
    if layout == "list":
        return a.tolist()
    raise AssertionError(layout)


def fresh(rng, shape, dtype):
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j).astype(dtype)
    if np.dtype(dtype) == np.bool_:
        return rng.random(shape) < 0.5
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 3, shape).astype(dtype)
    return np.full(shape, "x", dtype=object)


# -- oracles ------------------------------------------------------------------
def rope_oracle(x, theta, seq_axis, offset):
    """Rotary embedding in float64 (the rope target, and the MHA oracle's rope)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    half = d // 2
    pos = offset + np.arange(x.shape[seq_axis], dtype=np.float64)
    freq = np.array([theta ** (-2.0 * i / d) for i in range(half)])
    ang = pos[:, None] * freq[None, :]
    shape = [1] * x.ndim
    shape[seq_axis], shape[-1] = x.shape[seq_axis], half
    cos, sin = np.cos(ang).reshape(shape), np.sin(ang).reshape(shape)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
