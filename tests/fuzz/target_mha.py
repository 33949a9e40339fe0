"""Fuzz target: MultiHeadAttention, its construction (one argument at a
time made bad) and its call (shapes, dtypes, masks, layouts), against the
module's math recomputed from its state dict."""

from __future__ import annotations

import numpy as np
import tileattn
from hypothesis import strategies as st
from reference import _check, attention
from tileattn import DTypeError, InvalidParameterError, ShapeError

from .harness import (BAD, HUGE, LAYOUTS, TYPED, Expect, Fail, check_unmodified, laid_out,
                      must_have_raised, rope_oracle, run_expecting, snapshot, start_case)

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
                                          "kpm_bad", "nan", "mask3d"]))
    c["mask"] = draw(st.sampled_from([None, None, "bool", "float", "kpm", "causal", "window",
                                      "int", "int_kpm"]))
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
    if "attn_mask" in kw and np.asarray(kw["attn_mask"]).dtype.kind in "iu":
        kw["attn_mask"] = np.asarray(kw["attn_mask"]) != 0   # integers: nonzero = may attend
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
    start_case(c)
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
    elif c["mask"] == "int":
        kw["attn_mask"] = rng.integers(-1, 3, (lq, lk))
    elif c["mask"] == "int_kpm":
        kw["key_padding_mask"] = rng.integers(-1, 3, (lk,) if b is None else (bq, lk))
    elif c["mask"] == "causal":
        kw["is_causal"] = True
    elif c["mask"] == "window":
        kw["window"] = (2, 1)
    if mut == "mask_bad":
        kw["attn_mask"] = np.ones((lq + 2, lk + 2), bool)
        e.add(BAD, {"attn_mask"}, (ShapeError,))
    elif mut == "mask3d":
        # (Hq, Lq, Lk) unbatched, as PyTorch reads it; batched, a 3-D mask is
        # ambiguous (NumPy: heads, Keras: B, PyTorch: B*heads) and refused
        kw["attn_mask"] = rng.random((mha.num_heads, lq, lk)) < 0.7
        if b is not None:
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
