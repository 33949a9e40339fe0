"""Fuzz targets for tests/test_fuzz.py, each run in a child process.

    python tests/fuzz_child.py TARGET EXAMPLES CASE_FILE [SEED]

Hypothesis draws EXAMPLES cases of bad and odd input for one public entry
point. Every case must either give the right answer (checked against the
float64 oracle in reference.py or an independent NumPy formula) or raise one
of tileattn's typed errors (ShapeError, DTypeError, InvalidParameterError, or
MemoryError where the case asks for an impossible allocation) whose message
names the argument at fault. Anything else fails the case: another exception
type, a wrong or non-finite answer where a finite one is due, modified inputs.

Before each case its description is written to CASE_FILE, so that when the
process dies (segfault, abort, sanitizer report) or hangs, the parent can say
which case did it. On success the last line printed is
``fuzz TARGET: N cases passed``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import traceback

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tileattn  # noqa: E402
from reference import _check, assert_close_to_reference, attention  # noqa: E402
from tileattn import DTypeError, InvalidParameterError, ShapeError  # noqa: E402

TYPED = (ShapeError, DTypeError, InvalidParameterError)
# NaN in q, k or the mask must come out of every row that sees it (since the
# kernel fix of 86815a7); TILEATTN_FUZZ_STRICT_NAN=0 relaxes that to "any value".
STRICT_NAN = os.environ.get("TILEATTN_FUZZ_STRICT_NAN", "1") != "0"
sdpa = tileattn.scaled_dot_product_attention


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


LOG: CaseLog


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


# -- scaled_dot_product_attention ----------------------------------------------
LENGTHS = [0, 1, 2, 3, 5, 17, 95, 96, 97, 130, 240, 241]
BAD_DTYPES = [np.int32, np.int64, np.uint8, np.complex64, np.bool_, object]
ODD_INTS = [0, -1, -2, 1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]


@st.composite
def sdpa_cases(draw):
    c = {}
    c["seed"] = draw(st.integers(0, 2**32 - 1))
    c["batched"] = draw(st.booleans())
    c["b"] = draw(st.sampled_from([0, 1, 1, 2, 3])) if c["batched"] else 1
    c["hkv"] = draw(st.sampled_from([0, 1, 1, 2, 3])) if draw(st.integers(0, 15)) else 0
    c["group"] = draw(st.integers(1, 3))
    c["lq"] = draw(st.sampled_from(LENGTHS))
    c["lk"] = draw(st.sampled_from(LENGTHS))
    c["d"] = draw(st.sampled_from([0, 1, 2, 3, 8, 16, 33]))
    c["dv"] = draw(st.sampled_from([None, 0, 1, 5, 16]))
    c["dtype"] = draw(st.sampled_from(["float32", "float32", "float64", "float16"]))
    c["layouts"] = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    # at most a few mutations, from a menu of bad and odd input
    c["mut"] = draw(st.lists(st.sampled_from([
        "rank_down", "rank_up", "batch", "heads", "kv_heads", "kv_len", "head_dim",
        "dtype_bad", "dtype_mixed", "scalar", "nan", "inf", "huge",
    ]), max_size=2, unique=True)) if draw(st.integers(0, 2)) else []
    c["which"] = draw(st.sampled_from(["q", "k", "v"]))
    c["bad_dtype"] = draw(st.sampled_from(range(len(BAD_DTYPES))))
    c["mask"] = draw(st.sampled_from([None, None, "bool", "float", "float64", "float16",
                                      "int", "shape", "axes", "nan", "posinf", "ninf_rows",
                                      "list", "scalar", "str"]))
    c["mask_shape"] = draw(st.sampled_from(["LqLk", "B1LqLk", "Lk", "BHLqLk", "1H1Lk"]))
    c["kpm"] = draw(st.sampled_from([None, None, "bool", "prefix", "int01", "int2", "float",
                                     "shape", "none_real"]))
    c["key_lengths"] = draw(st.sampled_from([None, None, None, "ok", "neg", "big",
                                             "float", "shape"]))
    c["causal"] = draw(st.sampled_from([False, False, True, np.True_, 1, "yes", None]))
    c["window"] = draw(st.one_of(
        st.none(), st.none(), st.integers(-3, 300), st.sampled_from(ODD_INTS),
        st.tuples(st.integers(-3, 200), st.integers(-3, 200)),
        st.tuples(st.sampled_from(ODD_INTS), st.sampled_from(ODD_INTS)),
        st.sampled_from([1.5, "8", True, (1, 2, 3), (1.0, 2), np.int64(7), (np.int32(3), 0)])))
    c["scale"] = draw(st.one_of(
        st.none(), st.none(), st.floats(-100, 100),
        st.sampled_from([0.0, 1e-30, 1e30, float("nan"), float("inf"), -float("inf"), "1",
                         True, 1j, np.float32(0.25), 2])))
    c["dropout"] = draw(st.sampled_from([0.0, 0.0, 0.0, 0.3, 1.0, -0.1, 1.5, float("nan"),
                                         "0.1", True]))
    c["dseed"] = draw(st.sampled_from([None, 0, 7, 2**64 - 1, 2**64, -1, 1.5, True]))
    c["weights"] = draw(st.sampled_from([False, False, True, 1, None]))
    c["out"] = draw(st.sampled_from([None, None, None, "ok", "strided", "readonly", "shape",
                                     "dtype", "list", "alias", "unaligned"]))
    return c


def _nonfinite(c):
    return any(m in c["mut"] for m in ("nan", "inf")) or c["mask"] in ("nan", "posinf")


def build_sdpa(c):
    """(args, kwargs, expect, info) for one case description."""
    rng = np.random.default_rng(c["seed"])
    e = Expect()
    b, hkv, group, lq, lk, d = c["b"], c["hkv"], c["group"], c["lq"], c["lk"], c["d"]
    hq = hkv * group
    dv = d if c["dv"] is None else c["dv"]
    dtype = np.dtype(c["dtype"])
    shapes = {"q": [b, hq, lq, d], "k": [b, hkv, lk, d], "v": [b, hkv, lk, dv]}
    mut, which = c["mut"], c["which"]
    qkv_names = {"q", "k", "v"}
    if "batch" in mut and c["batched"]:
        shapes[which][0] += 1
        e.add(BAD, qkv_names, (ShapeError,))
    if "heads" in mut:
        if hkv >= 2 or hkv == 0:
            shapes["q"][1] += 1
            e.add(BAD, qkv_names, (ShapeError,))
    if "kv_heads" in mut:
        shapes["v"][1] += 1
        e.add(BAD, qkv_names, (ShapeError,))
    if "kv_len" in mut:
        shapes["v"][2] += 1
        e.add(BAD, qkv_names, (ShapeError,))
    if "head_dim" in mut:
        shapes["k" if which == "v" else which][3] += 1
        e.add(BAD, qkv_names, (ShapeError,))
    arrays = {n: fresh(rng, tuple(s), dtype) for n, s in shapes.items()}
    if "nan" in mut or "inf" in mut:
        a = arrays[which]
        if a.size:
            idx = tuple(rng.integers(0, s) for s in a.shape)
            a[idx] = np.nan if "nan" in mut else (np.inf if rng.random() < 0.5 else -np.inf)
    if not c["batched"]:
        arrays = {n: a[0] for n, a in arrays.items()}
    if "dtype_bad" in mut:
        bad = BAD_DTYPES[c["bad_dtype"]]
        arrays[which] = fresh(rng, arrays[which].shape, bad)
        e.add(BAD, qkv_names, (DTypeError,))
    if "dtype_mixed" in mut and "dtype_bad" not in mut:
        other = np.float64 if dtype != np.float64 else np.float32
        arrays[which] = arrays[which].astype(other)  # a fault only if it survives layout:
    values = dict(arrays)  # the values as the oracle sees them
    inputs = {}
    for n, lay in zip(("q", "k", "v"), c["layouts"]):
        a = arrays[n]
        if lay == "list" and np.asarray(a.tolist()).shape != a.shape:
            e.add(BAD, qkv_names, (ShapeError, DTypeError))  # [] loses the shape
        if lay == "list" and (a.dtype == object or (a.size == 0 and a.dtype.kind != "f")):
            lay = "contiguous"  # an empty list has no dtype to keep (np.asarray: float64)
        inputs[n] = laid_out(a, lay)
    if "rank_down" in mut:
        a = np.asarray(values[which])
        inputs[which] = values[which] = a[0] if len(a) else np.zeros(a.shape[1:], a.dtype)
        e.add(BAD, qkv_names, (ShapeError,))
    if "rank_up" in mut and "rank_down" not in mut:
        inputs[which] = values[which] = np.asarray(values[which])[None]
        e.add(BAD, qkv_names, (ShapeError,))
    if "scalar" in mut:
        inputs[which] = values[which] = 1.5
        e.add(BAD, qkv_names, (ShapeError, DTypeError))
    seen = {np.asarray(x).dtype for x in inputs.values()}
    if len(seen) > 1 and all(t.kind == "f" for t in seen):
        e.add(BAD, qkv_names, (DTypeError,))  # lists are float64, arrays maybe not
    batched = c["batched"]
    kw = {}
    b_eff = shapes["q"][0]
    # huge: zero-stride K/V with 2**22 keys and weights asked for (> 1 TB)
    if "huge" in mut and not e.kind == BAD:
        big = 2**40 if c["lq"] < 96 else 2**22
        qb = np.broadcast_to(np.ones((1,) * 4, dtype), (2, 64, 2**14 if big < 2**40 else 100, 4))
        kb = np.broadcast_to(np.ones((1,) * 4, dtype), (2, 64, big, 4))
        inputs = {"q": qb, "k": kb, "v": kb}
        values = None
        kw["return_weights"] = True
        e.add(HUGE, {"q", "k", "v", "weights", "return_weights"})
        return inputs, kw, e, None

    # masks
    mk = c["mask"]
    full = (b_eff, shapes["q"][1], lq, lk)
    mshape = {"LqLk": (lq, lk), "B1LqLk": (b_eff, 1, lq, lk), "Lk": (lk,),
              "BHLqLk": full, "1H1Lk": (1, shapes["q"][1], 1, lk)}[c["mask_shape"]]
    if not batched and len(mshape) == 4:
        mshape = mshape[1:]
    if mk is not None:
        if mk in ("bool", "list"):
            m = rng.random(mshape) < 0.7
            kw["attn_mask"] = m.tolist() if mk == "list" and m.ndim else m
            if mk == "list" and m.ndim and 0 in m.shape:
                kw["attn_mask"] = m  # an empty list has no dtype to keep
        elif mk in ("float", "float64", "float16", "nan", "posinf", "ninf_rows"):
            mdt = {"float64": np.float64, "float16": np.float16}.get(mk, dtype)
            m = rng.standard_normal(mshape).astype(mdt)
            if m.size:
                m[rng.random(mshape) < 0.2] = -np.inf
                if mk == "nan":
                    m.flat[rng.integers(0, m.size)] = np.nan
                if mk == "posinf":
                    m.flat[rng.integers(0, m.size)] = np.inf
                if mk == "ninf_rows" and m.ndim >= 2:
                    m[..., : max(1, m.shape[-2] // 2), :] = -np.inf
            kw["attn_mask"] = m
        elif mk == "int":
            kw["attn_mask"] = np.ones(mshape, np.int32)
            e.add(BAD, "attn_mask", (DTypeError,))
        elif mk == "str":
            kw["attn_mask"] = "everything"
            e.add(BAD, "attn_mask", (DTypeError,))
        elif mk == "scalar":
            kw["attn_mask"] = np.True_
        elif mk == "shape":
            kw["attn_mask"] = np.ones((lq + 1, lk + 2), bool)
            e.add(BAD, "attn_mask", (ShapeError,))
        elif mk == "axes":
            kw["attn_mask"] = np.ones((1,) * (5 if batched else 4) + (lk,), bool)
            e.add(BAD, "attn_mask", (ShapeError,))
    kp = c["kpm"]
    kshape = (b_eff, lk) if batched else (lk,)
    if kp is not None:
        if kp == "bool":
            kw["key_padding_mask"] = rng.random(kshape) < 0.7
        elif kp == "prefix":
            n = rng.integers(0, lk + 1, kshape[:-1] or (1,))
            m = np.arange(lk) < n[:, None]
            kw["key_padding_mask"] = m if batched else m[0]
        elif kp == "int01":
            kw["key_padding_mask"] = rng.integers(0, 2, kshape)
        elif kp == "none_real":
            kw["key_padding_mask"] = np.zeros(kshape, bool)
        elif kp == "int2":
            m = np.full(kshape, 2)
            kw["key_padding_mask"] = m
            if m.size:
                e.add(BAD, "key_padding_mask", (DTypeError,))
        elif kp == "float":
            kw["key_padding_mask"] = np.ones(kshape, np.float32)
            e.add(BAD, "key_padding_mask", (DTypeError,))
        elif kp == "shape":
            kw["key_padding_mask"] = np.ones((b_eff, lk + 2) if batched else (lk + 2,), bool)
            e.add(BAD, "key_padding_mask", (ShapeError,))
    kl = c["key_lengths"]
    if kl is not None:
        if kl == "ok":
            n = rng.integers(0, lk + 1, (b_eff,))
            kw["key_lengths"] = n if batched else n[0]
        elif kl in ("neg", "big"):
            n = np.full((b_eff,), -1 if kl == "neg" else lk + 1)
            kw["key_lengths"] = n if batched else n[0]
            if b_eff:
                e.add(BAD, "key_lengths", (InvalidParameterError,))
        elif kl == "float":
            kw["key_lengths"] = np.full((b_eff,) if batched else (), 1.0)
            e.add(BAD, "key_lengths", (DTypeError,))
        elif kl == "shape":
            kw["key_lengths"] = np.zeros((b_eff + 1,), np.int64)
            e.add(BAD, "key_lengths", (ShapeError,))
    causal = c["causal"]
    if causal is not False:
        kw["is_causal"] = causal
        if not isinstance(causal, (bool, np.bool_)):
            e.add(BAD, "is_causal", (InvalidParameterError,))
    w = c["window"]
    if w is not None:
        kw["window"] = w
        if not window_ok(w):
            e.add(BAD, "window", (InvalidParameterError,))
    s = c["scale"]
    if s is not None:
        kw["scale"] = s
        if isinstance(s, (bool, str, complex)) or not math.isfinite(float(s)):
            e.add(BAD, "scale", (InvalidParameterError,))
    p = c["dropout"]
    if p != 0.0 or c["dseed"] is not None:
        kw["dropout_p"] = p
        kw["seed"] = c["dseed"]
        p_ok = not isinstance(p, (bool, str)) and 0.0 <= p <= 1.0
        if not p_ok:
            e.add(BAD, "dropout_p", (InvalidParameterError,))
        sd = c["dseed"]
        if sd is not None and (isinstance(sd, (bool, float)) or not 0 <= sd < 2**64):
            e.add(BAD, "seed", (InvalidParameterError,))
    rw = c["weights"]
    if rw is not False:
        kw["return_weights"] = rw
        if not isinstance(rw, bool):
            e.add(BAD, "return_weights", (InvalidParameterError,))
    o = c["out"]
    seen_dt = np.asarray(inputs["q"]).dtype  # a list is float64
    if seen_dt.kind == "f":
        dtype = seen_dt
    out_shape = (b_eff, shapes["q"][1], lq, shapes["v"][3])
    if not batched:
        out_shape = out_shape[1:]
    if o is not None and e.kind != BAD:
        if o in ("ok", "strided", "readonly", "unaligned"):
            arr = np.full(out_shape, 7, dtype)
            arr = laid_out(arr, {"ok": "contiguous"}.get(o, o))
            kw["out"] = arr
            if o == "readonly":
                e.add(BAD, "out", (InvalidParameterError,))
        elif o == "shape":
            kw["out"] = np.empty(out_shape[:-1] + (out_shape[-1] + 1,), dtype)
            e.add(BAD, "out", (ShapeError,))
        elif o == "dtype":
            kw["out"] = np.empty(out_shape, np.float64 if dtype != np.float64 else np.float32)
            e.add(BAD, "out", (DTypeError,))
        elif o == "list":
            kw["out"] = [0.0]
            e.add(BAD, "out", (InvalidParameterError,))
        elif o == "alias":
            v_in = inputs["v"]
            if isinstance(v_in, np.ndarray) and v_in.shape == tuple(out_shape) \
                    and v_in.flags.writeable and v_in.dtype == dtype:
                kw["out"] = v_in
    return inputs, kw, e, values


def window_ok(w) -> bool:
    if isinstance(w, (bool, np.bool_)):
        return False
    if isinstance(w, (int, np.integer)):
        return int(w) >= 1
    if isinstance(w, tuple) and len(w) == 2:
        if any(isinstance(x, (bool, float, str)) for x in w):
            return False
        return all(int(x) >= -1 for x in w)
    return False


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


def target_sdpa(c):
    inputs, kw, e, values = build_sdpa(c)
    LOG.start(describe(c))
    if e.kind == BAD and e.names & {"q", "k", "v"}:
        # with q/k/v shapes wrong, a mask or out= made for the intended shapes
        # is inconsistent too and may be reported first
        e.names |= {n for n in ("attn_mask", "key_padding_mask", "key_lengths", "out")
                    if kw.get(n) is not None}
        e.errors = TYPED
    snap = snapshot([inputs[n] for n in ("q", "k", "v")] + [kw.get("attn_mask"),
                                                             kw.get("key_padding_mask")])
    ok, res = run_expecting(e, lambda: sdpa(inputs["q"], inputs["k"], inputs["v"], **kw))
    if not ok:
        return
    must_have_raised(e)
    if kw.get("out") is not inputs["v"]:
        check_unmodified(snap)
        if e.kind == HUGE:
            raise Fail("a > 1 TB weights array was 'allocated'")
        check_sdpa_result(res, inputs, kw, values, c)


def describe(c) -> str:
    return repr({k: v for k, v in c.items()})


# -- set_num_threads -----------------------------------------------------------
def target_threads(c):
    n = c["n"]
    LOG.start(repr(c))
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
        got = sdpa(q, q, q, is_causal=True)
        tileattn.set_num_threads(1)
        if not np.array_equal(got, sdpa(q, q, q, is_causal=True)):
            raise Fail(f"{n} threads give other bits than 1 thread")
    finally:
        tileattn.set_num_threads(before)


threads_cases = st.fixed_dictionaries({
    "n": st.one_of(st.integers(-5, 9), st.sampled_from(
        [0, 4096, 4097, 10**6, 2**31, 2**63, -(2**63), 2**100, np.int64(3), np.uint8(2),
         np.int64(-1), 2.0, 2.5, float("nan"), "2", None, True, False, np.True_, [2], 2j])),
    "seed": st.integers(0, 2**16)})


# -- rope ------------------------------------------------------------------------
def rope_oracle(x, theta, seq_axis, offset):
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
    LOG.start(repr(c))
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


# -- sinusoidal_positions ---------------------------------------------------------
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
    LOG.start(repr(c))
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


# -- MultiHeadAttention ------------------------------------------------------------
MHA_BAD = {
    # (no huge embed_dim: 10**12 is a known bug (E*E past NumPy's index type,
    # tests/test_resources.py::test_module_past_numpy_sizes_raises_memory_error),
    # and 10**7 with a small head_dim is a legal module of gigabytes)
    "embed_dim": [0, -8, 8.0, "8", True, None],
    "num_heads": [0, -1, 2.0, "2", True, 3, 10**12],
    "num_kv_heads": [0, 3, 2.0, -2, 10**12],
    "head_dim": [0, -4, 3.5, 10**12],
    "value_dim": [0, -1, "4", 10**12],
    "kdim": [0, -1, 4.0],
    "vdim": [0, 1.5],
    "output_dim": [0, -3, 10**12],
    "bias": [1, "yes", None],
    "dropout": [1.0, -0.1, float("nan"), "0.1", True],
    "rope": [1, "no"],
    "rope_theta": [0.0, -1.0, float("inf"), "1e4", True],
    "qk_norm": [0, None],
    "dtype": ["int32", np.float16, "complex64", "nonsense"],
    "seed": [-1, 1.5, "1", True],
}


@st.composite
def mha_cases(draw):
    c = {"seed": draw(st.integers(0, 2**32 - 1))}
    c["num_kv_heads"] = draw(st.sampled_from([1, 2]))
    c["num_heads"] = c["num_kv_heads"] * draw(st.sampled_from([1, 2]))
    c["head_dim"] = draw(st.sampled_from([None, 2, 4, 6]))
    c["embed_dim"] = c["num_heads"] * draw(st.sampled_from([2, 4])) \
        if c["head_dim"] is None else draw(st.sampled_from([3, 8]))
    c["kw"] = {}
    for name, values in [("value_dim", [3, 4]), ("kdim", [5, 8]), ("vdim", [6, 8]),
                         ("output_dim", [7]), ("bias", [False]), ("rope", [True]),
                         ("qk_norm", [True]), ("dtype", ["float64"])]:
        if draw(st.integers(0, 4)) == 0:
            c["kw"][name] = draw(st.sampled_from(values))
    c["bad"] = draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(sorted(MHA_BAD))))
    c["bad_value"] = draw(st.integers(0, 6))
    c["b"] = draw(st.sampled_from([None, 0, 1, 2]))
    c["lq"] = draw(st.sampled_from([0, 1, 3, 7, 100]))
    c["lk"] = draw(st.sampled_from([None, 0, 1, 5, 9]))
    c["call_mut"] = draw(st.sampled_from([None, None, None, "query_dim", "key_dim", "value_dim",
                                          "kv_len", "batch", "rank1", "int", "list", "mask_bad",
                                          "kpm_bad", "nan"]))
    c["mask"] = draw(st.sampled_from([None, None, "bool", "float", "kpm", "causal", "window"]))
    c["need_weights"] = draw(st.sampled_from([False, False, True]))
    c["average"] = draw(st.booleans())
    c["layout"] = draw(st.sampled_from(LAYOUTS))
    return c


def mha_oracle(mha, query, key, value, dtype, kw, need_weights, average):
    """The module's math from its state dict, in `dtype` (float64: the oracle)."""
    sd = {n: np.asarray(p, dtype) for n, p in mha.state_dict().items()}
    unb = query.ndim == 2
    qx, kx, vx = (np.asarray(a, dtype)[None] if unb else np.asarray(a, dtype)
                  for a in (query, key, value))

    def proj(x, name):
        y = x @ sd[f"{name}.weight"].T
        return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y
    hq, hkv, d, dv = mha.num_heads, mha.num_kv_heads, mha.head_dim, mha.value_dim
    b = qx.shape[0]
    q = proj(qx, "q_proj").reshape(b, qx.shape[1], hq, d).transpose(0, 2, 1, 3)
    k = proj(kx, "k_proj").reshape(b, kx.shape[1], hkv, d).transpose(0, 2, 1, 3)
    v = proj(vx, "v_proj").reshape(b, vx.shape[1], hkv, dv).transpose(0, 2, 1, 3)
    if mha.rope:
        q = rope_oracle(q, mha.rope_theta, 2, 0).astype(dtype)
        k = rope_oracle(k, mha.rope_theta, 2, 0).astype(dtype)
    kw = dict(kw)
    if unb:
        for n in ("key_padding_mask",):
            if n in kw:
                kw[n] = np.asarray(kw[n])[None]
    o, w = attention(q, k, v, dtype=dtype, **kw)
    y = proj(o.transpose(0, 2, 1, 3).reshape(b, qx.shape[1], hq * dv), "out_proj")
    if average:
        w = w.mean(axis=1)
    return (y[0], w[0]) if unb else (y, w)


def target_mha(c):
    LOG.start(repr(c))
    rng = np.random.default_rng(c["seed"])
    ctor = dict(num_kv_heads=c["num_kv_heads"], head_dim=c["head_dim"], seed=c["seed"] % 1000,
                **c["kw"])
    args = [c["embed_dim"], c["num_heads"]]
    e = Expect()
    if ctor.get("rope") and (ctor["head_dim"] or c["embed_dim"] // c["num_heads"]) % 2:
        e.add(BAD, {"rope", "head_dim"}, (InvalidParameterError,))
    if c["bad"] is not None:
        values = MHA_BAD[c["bad"]]
        bad = values[c["bad_value"] % len(values)]
        if c["bad"] == "embed_dim":
            args[0] = bad
        elif c["bad"] == "num_heads":
            args[1] = bad
        else:
            ctor[c["bad"]] = bad
        if isinstance(bad, int) and not isinstance(bad, bool) and bad >= 10**12:
            e.add(HUGE, {c["bad"], "embed_dim", "num_heads", "num_kv_heads", "head_dim"})
        elif c["bad"] == "num_heads" and bad == 3:
            hd = ctor["head_dim"]
            if 3 % ctor["num_kv_heads"] or (hd is None and args[0] % 3):
                e.add(BAD, {"num_heads", "num_kv_heads", "embed_dim"}, (InvalidParameterError,))
            elif ctor.get("rope") and (hd or args[0] // 3) % 2:
                e.add(BAD, {"rope", "head_dim"}, (InvalidParameterError,))
        elif c["bad"] == "num_kv_heads" and bad == 3:
            e.add(BAD, {"num_heads", "num_kv_heads"}, (InvalidParameterError,))
        else:
            e.add(BAD, {c["bad"], "rope"}, (DTypeError,) if c["bad"] == "dtype"
                  else (InvalidParameterError,))
    ok, mha = run_expecting(e, lambda: tileattn.MultiHeadAttention(*args, **ctor))
    if not ok:
        return
    if e.kind == HUGE:
        # A huge size that the Python layer accepts must then be a real, usable module:
        # only sizes below 10**12 with 10**12-sized siblings avoided... fail loudly.
        raise Fail("a module with 10**12-sized projections was built without MemoryError")
    must_have_raised(e)
    if c["bad"] is None:
        return call_mha(mha, c, rng)


def call_mha(mha, c, rng):
    dtype = mha.dtype
    b, lq = c["b"], c["lq"]
    lk = lq if c["lk"] is None else c["lk"]
    lead = () if b is None else (b,)
    self_attn = c["lk"] is None and mha.packed
    query = rng.standard_normal(lead + (lq, mha.embed_dim)).astype(dtype)
    key = query if self_attn else rng.standard_normal(lead + (lk, mha.kdim)).astype(dtype)
    value = query if self_attn else rng.standard_normal(lead + (lk, mha.vdim)).astype(dtype)
    e = Expect()
    mut = c["call_mut"]
    if mut == "query_dim":
        query = query[..., :-1]
        e.add(BAD, {"query"}, (ShapeError,))
        self_attn = False if not self_attn else self_attn
    elif mut == "key_dim" and not self_attn:
        key = np.concatenate([key, key[..., :1]], axis=-1)
        e.add(BAD, {"key"}, (ShapeError,))
    elif mut == "value_dim" and not self_attn:
        value = value[..., 1:]
        e.add(BAD, {"value"}, (ShapeError,))
    elif mut == "kv_len" and not self_attn and lk:
        value = np.concatenate([value, value], axis=-2)
        e.add(BAD, {"key", "value"}, (ShapeError,))
    elif mut == "batch" and not self_attn and b:
        key = np.concatenate([key, key], axis=0)
        value = np.concatenate([value, value], axis=0)
        e.add(BAD, {"query", "key", "value"}, (ShapeError,))
    elif mut == "rank1":
        query = query.reshape(-1)
        e.add(BAD, {"query"}, (ShapeError,))
    elif mut == "int":
        query = (query * 10).astype(np.int64)
        e.add(BAD, {"query"}, (DTypeError,))
    elif mut == "nan" and query.size:
        query = query.copy()
        query.flat[0] = np.nan
    key_arg = None if self_attn else key
    value_arg = None if self_attn else value
    kw = {}
    bq = (b or 0) if b is not None else None
    if c["mask"] == "bool":
        kw["attn_mask"] = rng.random((lq, lk)) < 0.7
    elif c["mask"] == "float":
        m = rng.standard_normal((lq, lk))
        m[rng.random((lq, lk)) < 0.3] = -np.inf
        kw["attn_mask"] = m.astype(dtype)
    elif c["mask"] == "kpm":
        kw["key_padding_mask"] = rng.random((lk,) if b is None else (bq, lk)) < 0.7
    elif c["mask"] == "causal":
        kw["is_causal"] = True
    elif c["mask"] == "window":
        kw["window"] = (2, 1)
    if mut == "mask_bad":
        kw["attn_mask"] = np.ones((lq + 2, lk + 2), bool)
        e.add(BAD, {"attn_mask"}, (ShapeError,))
    elif mut == "kpm_bad":
        kw["key_padding_mask"] = np.ones((3, lk + 2), np.float32)
        e.add(BAD, {"key_padding_mask"}, (ShapeError, DTypeError))
    q_in = laid_out(query, c["layout"]) if c["layout"] != "list" or mut == "int" else query
    snap = snapshot([q_in, key, value])
    e.errors = TYPED  # the module checks rank, features and dtype in its own order
    e.names |= {"query", "key", "value"} if e.kind == BAD else set()
    ok, res = run_expecting(e, lambda: mha(q_in, key_arg, value_arg, need_weights=c["need_weights"],
                                           average_attn_weights=c["average"], **kw))
    if not ok:
        return
    must_have_raised(e)
    check_unmodified(snap)
    y, w = res if c["need_weights"] else (res, None)
    qv = np.asarray(q_in)
    want_y, want_w = mha_oracle(mha, qv, qv if self_attn else key, qv if self_attn else value,
                                np.float64, kw, c["need_weights"], c["average"])
    plain_y, plain_w = mha_oracle(mha, qv, qv if self_attn else key, qv if self_attn else value,
                                  np.float32 if dtype == np.float32 else np.float64, kw,
                                  c["need_weights"], c["average"])
    if y.shape != want_y.shape:
        raise Fail(f"output shape {y.shape}, expected {want_y.shape}")
    if mut == "nan":
        return  # a NaN token poisons every row that sees it; shape checked
    if mha.qk_norm:
        if not np.isfinite(y).all():
            raise Fail("qk_norm module gave non-finite output")
        return  # the oracle has no LayerNorm; shape and finiteness only
    scale = max(1.0, float(np.abs(want_y).max(initial=0)))
    _check("mha output", y, want_y, plain_y, scale)
    if w is not None:
        if w.shape != want_w.shape:
            raise Fail(f"weights shape {w.shape}, expected {want_w.shape}")
        _check("mha weights", w, want_w, plain_w, 1.0)


# -- KVCache ----------------------------------------------------------------------
@st.composite
def cache_cases(draw):
    c = {"seed": draw(st.integers(0, 2**32 - 1))}
    c["ctor"] = {"batch": draw(st.sampled_from([1, 2, 3])),
                 "num_kv_heads": draw(st.sampled_from([1, 2])),
                 "max_len": draw(st.sampled_from([1, 5, 40, 300])),
                 "head_dim": draw(st.sampled_from([1, 4, 16])),
                 "value_dim": draw(st.sampled_from([None, 3])),
                 "dtype": draw(st.sampled_from(["float32", "float16", "float64"])),
                 "window": draw(st.sampled_from([None, None, 1, 4, 30]))}
    c["ctor_bad"] = draw(st.sampled_from([None, None, None, ("batch", 0), ("num_kv_heads", -1),
                                          ("max_len", 2.5), ("head_dim", "4"),
                                          ("value_dim", 0), ("dtype", "int8"),
                                          ("window", 0), ("max_len", 10**15),
                                          ("batch", True)]))
    c["ops"] = draw(st.lists(st.tuples(
        st.sampled_from(["attend", "attend", "append", "trim", "reset", "contents", "bad"]),
        st.integers(0, 2**16)), min_size=1, max_size=6))
    return c


def target_cache(c):
    LOG.start(repr(c))
    rng = np.random.default_rng(c["seed"])
    ctor = dict(c["ctor"])
    e = Expect()
    if c["ctor_bad"]:
        name, bad = c["ctor_bad"]
        ctor[name] = bad
        if bad == 10**15:
            e.add(HUGE, {"max_len", "batch"})
            if ctor["window"] is not None:
                e = Expect()  # a ring is allocated at its window: fine
        else:
            e.add(BAD, name, (DTypeError,) if name == "dtype" else (InvalidParameterError,))
    ok, cache = run_expecting(e, lambda: tileattn.KVCache(**ctor))
    if not ok:
        return
    if e.kind == HUGE:
        raise Fail("a 10**15-row cache was allocated")
    must_have_raised(e)
    B, H = cache.batch, cache.num_kv_heads
    D, Dv, dt = cache.head_dim, cache.value_dim, cache.dtype
    qdt = np.float64 if dt == np.float64 else np.float32
    hist_k = [np.zeros((H, 0, D)) for _ in range(B)]
    hist_v = [np.zeros((H, 0, Dv)) for _ in range(B)]
    for op, s in c["ops"]:
        r = np.random.default_rng(s)
        t = int(r.integers(0, 6))
        lengths = np.array([h.shape[1] for h in hist_k])
        if op in ("attend", "append", "bad"):
            k = r.standard_normal((B, H, t, D)).astype(qdt)
            v = r.standard_normal((B, H, t, Dv)).astype(qdt)
            counts = None if r.random() < 0.6 else r.integers(0, t + 1, B)
            ee = Expect()
            n_new = np.full(B, t) if counts is None else counts
            if (lengths + n_new > cache.max_len).any():
                ee.add(BAD, {"max_len", "k", "v", "counts"}, (InvalidParameterError,))
            if op == "bad":
                which = int(r.integers(0, 4))
                if which == 0:
                    k = k[..., :-1] if D > 1 else k[..., :0]
                    ee.add(BAD, {"k", "v"}, (ShapeError,))
                elif which == 1:
                    v = v[:, :, :max(t - 1, 0)] if t else np.concatenate([v, v[:, :, :0]], 2)
                    if t:
                        ee.add(BAD, {"k", "v"}, (ShapeError,))
                elif which == 2:
                    k = k.astype(np.int32)
                    ee.add(BAD, {"k"}, (DTypeError,))
                else:
                    counts = np.full(B, t + 1)
                    ee.add(BAD, {"counts"}, (InvalidParameterError,))
            if op in ("attend", "bad"):
                hq = H * int(r.integers(1, 3))
                q = r.standard_normal((B, hq, t, D)).astype(qdt)
                causal = bool(r.random() < 0.7) or cache.window is not None
                ok, out = run_expecting(ee, lambda: cache.attend(q, k, v, counts=counts,
                                                                 is_causal=causal))
            else:
                ok, out = run_expecting(ee, lambda: cache.append(k, v, counts=counts))
            if not ok:
                if not np.array_equal(cache.lengths, lengths):
                    raise Fail("a refused append changed the lengths")
                continue
            must_have_raised(ee)
            for bi in range(B):
                n = int(n_new[bi])
                kk = k[bi, :, :n].astype(dt).astype(np.float64)
                vv = v[bi, :, :n].astype(dt).astype(np.float64)
                hist_k[bi] = np.concatenate([hist_k[bi], kk], axis=1)
                hist_v[bi] = np.concatenate([hist_v[bi], vv], axis=1)
            if not np.array_equal(cache.lengths, [h.shape[1] for h in hist_k]):
                raise Fail(f"lengths {cache.lengths} != {[h.shape[1] for h in hist_k]}")
            if op in ("attend", "bad"):
                for bi in range(B):
                    n = int(n_new[bi])
                    kk = hist_k[bi][None].astype(qdt)
                    vv = hist_v[bi][None].astype(qdt)
                    kw = {"is_causal": causal}
                    if cache.window is not None:
                        kw["window"] = cache.window
                    got = out[bi:bi + 1, :, :n]
                    assert_close_to_reference(got, q[bi:bi + 1, :, :n], kk, vv, **kw)
                    if out[bi, :, n:].any():
                        raise Fail("padding rows of attend's output are not zero")
        elif op == "trim":
            n = int(r.integers(-1, 4))
            ee = Expect()
            over = (lengths < n).any() or n < 0
            ring_blocked = cache.window is not None and (lengths > cache.window).any() and n > 0
            if over:
                ee.add(BAD, {"n", "trim"}, (InvalidParameterError,))
            elif ring_blocked:
                ee.add(EITHER, {"n", "trim", "window", "ring"}, (InvalidParameterError,))
            ok, _ = run_expecting(ee, lambda: cache.trim(n))
            if ok:
                must_have_raised(ee)
                hist_k = [h[:, :h.shape[1] - n] for h in hist_k]
                hist_v = [h[:, :h.shape[1] - n] for h in hist_v]
            elif not np.array_equal(cache.lengths, lengths):
                raise Fail("a refused trim changed the lengths")
        elif op == "reset":
            cache.reset()
            hist_k = [h[:, :0] for h in hist_k]
            hist_v = [h[:, :0] for h in hist_v]
        elif op == "contents":
            bi = int(r.integers(-1, B + 1))
            ee = Expect()
            if not 0 <= bi < B:
                ee.add(BAD, {"b"}, (InvalidParameterError,))
            ok, kv = run_expecting(ee, lambda: cache.contents(bi))
            if ok:
                must_have_raised(ee)
                kk, vv = kv
                keep = hist_k[bi].shape[1] if cache.window is None else \
                    min(cache.window, hist_k[bi].shape[1])
                if not (np.array_equal(np.asarray(kk, np.float64),
                                       hist_k[bi][:, hist_k[bi].shape[1] - keep:])
                        and np.array_equal(np.asarray(vv, np.float64),
                                           hist_v[bi][:, hist_v[bi].shape[1] - keep:])):
                    raise Fail(f"contents({bi}) differ from what was appended")


# -- load_state_dict ----------------------------------------------------------------
@st.composite
def sd_cases(draw):
    return {
        "seed": draw(st.integers(0, 2**32 - 1)),
        "kdim": draw(st.sampled_from([None, 6])),
        "bias": draw(st.booleans()),
        "torch": draw(st.booleans()),
        "mut": draw(st.sampled_from([None, None, "drop", "extra", "shape", "list", "str",
                                     "int", "nan", "not_mapping", "in_proj_rows", "object",
                                     "scalar", "complex"])),
        "strict": draw(st.sampled_from([True, True, False])),
        "pick": draw(st.integers(0, 100)),
    }


def target_state_dict(c):
    LOG.start(repr(c))
    rng = np.random.default_rng(c["seed"])
    kw = {} if c["kdim"] is None else {"kdim": c["kdim"]}
    mha = tileattn.MultiHeadAttention(8, 2, bias=c["bias"], seed=1, **kw)
    before = mha.state_dict()
    sd = {n: rng.standard_normal(p.shape) for n, p in before.items()}
    if c["torch"] and mha.packed:
        parts = [sd.pop(f"{n}_proj.weight") for n in "qkv"]
        sd["in_proj_weight"] = np.concatenate(parts)
        if c["bias"]:
            sd["in_proj_bias"] = np.concatenate([sd.pop(f"{n}_proj.bias") for n in "qkv"])
    keys = sorted(sd)
    key = keys[c["pick"] % len(keys)]
    e = Expect()
    mut, strict = c["mut"], c["strict"]
    arg = sd
    if mut == "drop":
        del sd[key]
        if strict:
            e.add(BAD, {key}, (InvalidParameterError,))
    elif mut == "extra":
        sd["extra.weight"] = np.zeros(3)
        if strict:
            e.add(BAD, {"extra.weight"}, (InvalidParameterError,))
    elif mut == "shape":
        sd[key] = np.zeros(np.asarray(sd[key]).shape[:-1] + (np.asarray(sd[key]).shape[-1] + 1,))
        e.add(BAD, {key, key.replace("in_proj_weight", "q_proj.weight")},
              (ShapeError, InvalidParameterError))
    elif mut == "list":
        sd[key] = np.asarray(sd[key]).tolist()
    elif mut == "str":
        sd[key] = np.full(np.shape(sd[key]), "x")
        e.add(BAD, {key, "q_proj.weight", "q_proj.bias"}, (DTypeError,))
    elif mut == "object":
        sd[key] = object()
        e.add(BAD, {key, "q_proj.weight", "q_proj.bias"}, (DTypeError, ShapeError))
    elif mut == "complex":
        sd[key] = np.asarray(sd[key]) + 1j
        e.add(BAD, {key, "q_proj.weight", "q_proj.bias"}, (DTypeError,))
    elif mut == "scalar":
        sd[key] = 1.0
        e.add(BAD, {key, "q_proj.weight", "q_proj.bias"}, (ShapeError,))
    elif mut == "int":
        sd[key] = np.round(np.asarray(sd[key]) * 3).astype(np.int64)
    elif mut == "nan":
        a = np.array(sd[key])
        a.flat[0] = np.nan
        sd[key] = a
    elif mut == "not_mapping":
        arg = list(sd.items())
        e.add(BAD, {"state_dict"}, (InvalidParameterError,))
    elif mut == "in_proj_rows" and "in_proj_weight" in sd:
        sd["in_proj_weight"] = sd["in_proj_weight"][:-1]
        e.add(BAD, {"in_proj_weight"}, (ShapeError,))
    if e.names & {"in_proj_weight", "in_proj_bias", "q_proj.weight", "q_proj.bias"}:
        e.names |= {"in_proj_weight", "in_proj_bias"} | {
            f"{n}_proj.{a}" for n in "qkv" for a in ("weight", "bias")}
    ok, _ = run_expecting(e, lambda: mha.load_state_dict(arg, strict=strict))
    after = mha.state_dict()
    if not ok:
        for n in before:
            if not np.array_equal(before[n], after[n]):
                raise Fail(f"a failed load changed {n}")
        return
    must_have_raised(e)
    want = dict(sd)
    sizes = [mha.q_proj.out_features, mha.k_proj.out_features, mha.v_proj.out_features]
    for attr in ("weight", "bias"):
        if f"in_proj_{attr}" in want:
            parts = np.split(np.asarray(want.pop(f"in_proj_{attr}")), np.cumsum(sizes)[:-1])
            for n, part in zip("qkv", parts):
                want[f"{n}_proj.{attr}"] = part
    for n, p in after.items():
        if n in want:
            exp = np.asarray(want[n]).astype(p.dtype)
            if not np.array_equal(p, exp, equal_nan=True):
                raise Fail(f"{n} not loaded as given")
        elif not np.array_equal(p, before[n]):
            raise Fail(f"{n} changed though not in the state dict")
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    y = mha(x, rng.standard_normal((2, 4, mha.kdim)).astype(np.float32),
            rng.standard_normal((2, 4, mha.vdim)).astype(np.float32)) if not mha.packed \
        else mha(x)
    if mut != "nan" and not np.isfinite(y).all():
        raise Fail("the module gives non-finite output after a load of finite weights")


# -- self-tests of the harness: a crash and an untyped error must be caught ----------
def target_selftest_crash(c):
    LOG.start(repr(c))
    if c["n"] == 3:
        import ctypes
        ctypes.string_at(0)  # SIGSEGV


def target_selftest_untyped(c):
    LOG.start(repr(c))
    run_expecting(Expect(), lambda: int("not a number"))


# ---------------------------------------------------------------------------------
TARGETS = {
    "selftest_crash": (target_selftest_crash, st.fixed_dictionaries({"n": st.integers(0, 5)})),
    "selftest_untyped": (target_selftest_untyped, st.fixed_dictionaries({"n": st.just(0)})),
    "sdpa": (target_sdpa, sdpa_cases()),
    "threads": (target_threads, threads_cases),
    "rope": (target_rope, rope_cases()),
    "sinusoidal": (target_sinusoidal, sinus_cases),
    "mha": (target_mha, mha_cases()),
    "cache": (target_cache, cache_cases()),
    "state_dict": (target_state_dict, sd_cases()),
}


def main(argv) -> int:
    global LOG
    name, examples, case_file = argv[1], int(argv[2]), argv[3]
    run_seed = int(argv[4]) if len(argv) > 4 else int.from_bytes(os.urandom(4), "little")
    LOG = CaseLog(case_file)
    fn, strategy = TARGETS[name]
    print(f"fuzz {name}: seed {run_seed}, {examples} examples", flush=True)

    @hyp_seed(run_seed)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(strategy)
    def run(case):
        fn(case)

    run()
    print(f"fuzz {name}: {LOG.count} cases passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
