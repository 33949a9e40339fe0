"""Fuzz target: scaled_dot_product_attention.

A case is q/k/v of drawn shapes, dtype and memory layouts, at most a few
mutations from a menu of bad and odd input, and every keyword (masks,
key_lengths, causal, window, scale, dropout, weights, out=) drawn valid or
not. build_sdpa turns it into the call and what the call may do;
sdpa_check.py holds the checks of the answer.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st
from tileattn import DTypeError, InvalidParameterError, ShapeError, scaled_dot_product_attention

from .harness import (BAD, HUGE, LAYOUTS, TYPED, Expect, Fail, check_unmodified, fresh,
                      laid_out, must_have_raised, run_expecting, snapshot, start_case)
from .sdpa_check import check_sdpa_result

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
            # nonzero = may attend (Keras' 0/1, Kaun's "nonzero keeps")
            kw["attn_mask"] = rng.integers(-2, 3, mshape).astype(np.int32)
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
            kw["key_padding_mask"] = rng.integers(-1, 3, kshape)   # nonzero = real token
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


def target_sdpa(c):
    inputs, kw, e, values = build_sdpa(c)
    start_case(c)
    if e.kind == BAD and e.names & {"q", "k", "v"}:
        # with q/k/v shapes wrong, a mask or out= made for the intended shapes
        # is inconsistent too and may be reported first
        e.names |= {n for n in ("attn_mask", "key_padding_mask", "key_lengths", "out")
                    if kw.get(n) is not None}
        e.errors = TYPED
    snap = snapshot([inputs[n] for n in ("q", "k", "v")] + [kw.get("attn_mask"),
                                                             kw.get("key_padding_mask")])
    ok, res = run_expecting(e, lambda: scaled_dot_product_attention(
        inputs["q"], inputs["k"], inputs["v"], **kw))
    if not ok:
        return
    must_have_raised(e)
    if kw.get("out") is not inputs["v"]:
        check_unmodified(snap)
        if e.kind == HUGE:
            raise Fail("a > 1 TB weights array was 'allocated'")
        check_sdpa_result(res, inputs, kw, values, c)


