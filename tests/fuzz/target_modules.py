"""Fuzz target: the layers and optimisers around the attention (Linear,
LayerNorm, FeedForward, LSTM, TransformerEncoderLayer, SGD, AdamW) built
with one bad argument, called with bad or odd input (integer, complex,
object, 0-d, wrong width, big-endian, empty batches forward and backward),
and the aliasing rules of the functional API and the cache (outputs over
inputs or over each other). A valid case must give the right answer (the
float64 formula, or the same call on separate arrays); a bad one a typed
error naming the argument, or MemoryError for a size no memory holds."""

from __future__ import annotations

import numpy as np
import tileattn
from hypothesis import strategies as st
from tileattn import DTypeError, InvalidParameterError, ShapeError

from .harness import BAD, HUGE, Expect, Fail, must_have_raised, run_expecting, start_case

T = tileattn
HUGE_INT = 10**19
BAD_VALUES = [0, -3, 2.5, "4", True, None, HUGE_INT]

# name -> (constructor, its valid arguments, the arguments that must be positive ints)
BUILDERS = {
    "Linear": (lambda **a: T.Linear(**a), dict(in_features=4, out_features=3),
               ("in_features", "out_features")),
    "LayerNorm": (lambda **a: T.LayerNorm(**a), dict(normalized_shape=4), ("normalized_shape",)),
    "FeedForward": (lambda **a: T.FeedForward(**a), dict(d_model=4, dim_feedforward=6),
                    ("d_model", "dim_feedforward")),
    "LSTM": (lambda **a: T.LSTM(**a), dict(input_size=4, hidden_size=3),
             ("input_size", "hidden_size", "num_layers")),
    "TransformerEncoderLayer": (lambda **a: T.TransformerEncoderLayer(**a),
                                dict(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0),
                                ("d_model", "nhead", "dim_feedforward")),
}
OTHER_BAD = {"bias": "yes", "dtype": "int32", "eps": "x", "layer_norm_eps": -1.0,
             "dropout": 1.5, "seed": -1}
CALLS = ["ok", "ok", "empty_batch", "empty_length", "int", "complex", "object", "scalar",
         "width", "big_endian", "list"]
ALIAS = ["out_over_mask", "out_over_q", "grads_same", "grads_over_dout", "cache_out_storage",
         "cache_out_over_q"]


@st.composite
def module_cases(draw):
    c = {"seed": draw(st.integers(0, 2**32 - 1)),
         "kind": draw(st.sampled_from(["build", "build", "call", "call", "call", "optim",
                                       "alias"])),
         "module": draw(st.sampled_from(sorted(BUILDERS))),
         "bad": draw(st.one_of(st.none(), st.integers(0, 20))),
         "value": draw(st.integers(0, len(BAD_VALUES) - 1)),
         "call": draw(st.sampled_from(CALLS)),
         "alias": draw(st.sampled_from(ALIAS)),
         "optim": draw(st.sampled_from(["lr", "params", "grads", "state", "ok"])),
         "b": draw(st.integers(1, 3)), "l": draw(st.integers(1, 5))}
    return c


def build_case(c):
    make, args, ints = BUILDERS[c["module"]]
    args = dict(args)
    e = Expect()
    if c["bad"] is not None:
        names = list(ints) + list(OTHER_BAD)
        name = names[c["bad"] % len(names)]
        if name in ints:
            value = BAD_VALUES[c["value"]]
            e.add(HUGE if value == HUGE_INT else BAD, name)
        else:
            value = OTHER_BAD[name]
            e.add(BAD, name, (DTypeError,) if name == "dtype" else (InvalidParameterError,))
        accepts = {"Linear": {"bias", "dtype"}, "LayerNorm": {"bias", "dtype", "eps"},
                   "FeedForward": {"bias", "dtype", "dropout", "seed"},
                   "LSTM": {"bias", "dtype", "dropout", "seed"},
                   "TransformerEncoderLayer": {"bias", "dtype", "dropout", "seed",
                                               "layer_norm_eps"}}[c["module"]]
        if name not in ints and name not in accepts:
            return Expect(), make, args   # (an argument this module does not take)
        args[name] = value
    return e, make, args


def target_modules(c):
    start_case(c)
    if c["kind"] == "optim":
        return optim_case(c)
    if c["kind"] == "alias":
        return alias_case(c, np.random.default_rng(c["seed"]))
    e, make, args = build_case(c) if c["kind"] == "build" else (Expect(),) + BUILDERS[
        c["module"]][:2]
    ok, m = run_expecting(e, lambda: make(**args))
    if not ok:
        return
    if e.kind == HUGE:
        raise Fail("a module with a 10**19 size was built without MemoryError")
    must_have_raised(e)
    if c["kind"] == "call":
        call_case(c, m, np.random.default_rng(c["seed"]))


def call_case(c, m, rng):
    width = next(iter(BUILDERS[c["module"]][1].values()))
    b, length = c["b"], c["l"]
    call = c["call"]
    if call == "empty_batch":
        b = 0
    if call == "empty_length":
        length = 0 if c["module"] != "LSTM" else length
    x = rng.standard_normal((b, length, width)).astype(np.float32)
    e = Expect()
    if call in ("int", "complex", "object"):
        x = {"int": (x * 4).astype(np.int64), "complex": x.astype(np.complex64),
             "object": x.astype(object)}[call]
        e.add(BAD, {"x", "src"}, (DTypeError,))
    elif call == "scalar":
        x = np.float32(1.0)
        e.add(BAD, {"x", "src"}, (ShapeError,))
    elif call == "width":
        x = x[..., :-1]
        e.add(BAD, {"x", "src"}, (ShapeError,))
    elif call == "big_endian":
        x = x.astype(">f4")
    ok, y = run_expecting(e, lambda: m(x.tolist() if call == "list" and x.size else x))
    if not ok:
        return
    must_have_raised(e)
    y = y[0] if isinstance(y, tuple) else y
    xn = np.asarray(x, np.float64)
    if c["module"] == "Linear":
        want = xn @ m.weight.T.astype(np.float64) + m.bias
        if not np.allclose(y, want, rtol=1e-5, atol=1e-5):
            raise Fail("Linear differs from x W^T + b")
    elif c["module"] == "LayerNorm":
        mu = xn.mean(-1, keepdims=True) if xn.size else xn
        want = (xn - mu) / np.sqrt(((xn - mu) ** 2).mean(-1, keepdims=True) + m.eps) \
            if xn.size else xn
        if not np.allclose(y, want, rtol=1e-4, atol=1e-4):
            raise Fail("LayerNorm differs from its formula")
    if y.shape[:2] != (b, length) or not np.isfinite(y).all():
        raise Fail(f"output of shape {y.shape} (or non-finite) for input {x.shape}")
    if c["module"] != "LSTM":
        y = m(x, training=True)
        dx = m.backward(np.ones_like(y))
        if dx.shape != x.shape:
            raise Fail(f"backward gave {dx.shape} for input {x.shape}")
        if x.size == 0 and any(g.any() for g in m.grads.values()):
            raise Fail("an empty batch gave nonzero parameter gradients")


def optim_case(c):
    p = [np.ones(3), np.ones((2, 2))]
    which = c["optim"]
    e = Expect()
    if which == "lr":
        e.add(BAD, "lr")
        ok, _ = run_expecting(e, lambda: T.optim.AdamW(p, lr=BAD_VALUES[c["value"]] if
                                                      c["value"] in (1, 3, 4) else -1.0))
    elif which == "params":
        e.add(BAD, "params")
        ok, _ = run_expecting(e, lambda: T.optim.SGD([None, 5, "x"][c["value"] % 3]))
    elif which == "grads":
        e.add(BAD, "grads")
        opt = T.optim.SGD(p)
        ok, _ = run_expecting(e, lambda: opt.step([5, {7: 1}, [np.ones(2)]][c["value"] % 3]))
    elif which == "state":
        e.add(BAD, "state")
        opt = T.optim.SGD(p)
        ok, _ = run_expecting(e, lambda: opt.load_state_dict([5, {"0": 1}][c["value"] % 2]))
    else:
        opt = T.optim.SGD(p, lr=0.5)
        opt.step([np.ones(3), np.ones((2, 2))])
        if not (np.all(p[0] == 0.5) and np.all(p[1] == 0.5)):
            raise Fail("SGD step differs from p - lr * g")
        return
    if ok:
        must_have_raised(e)


def alias_case(c, rng):
    """Overlapping outputs: the result of separate arrays, or a refusal."""
    n = 4
    q = rng.standard_normal((n, n, n)).astype(np.float32)
    kind = c["alias"]
    if kind == "out_over_mask":
        m = rng.standard_normal((n, n, n)).astype(np.float32)
        want = T.scaled_dot_product_attention(q, q, q, attn_mask=m.copy())
        got = T.scaled_dot_product_attention(q, q, q, attn_mask=m, out=m.T)
    elif kind == "out_over_q":
        q2 = q.copy()
        want = T.scaled_dot_product_attention(q2, q2, q2, is_causal=True)
        got = T.scaled_dot_product_attention(q, q, q, is_causal=True, out=q[:, ::-1])
    elif kind in ("grads_same", "grads_over_dout"):
        out, lse = T.scaled_dot_product_attention(q, q, q, return_lse=True)
        g = rng.standard_normal(q.shape).astype(np.float32)
        want = T.scaled_dot_product_attention_backward(g.copy(), q, q, q, out, lse)
        if kind == "grads_same":
            u = np.empty_like(q)
            e = Expect()
            e.add(BAD, {"grads_out"}, (InvalidParameterError,))
            run_expecting(e, lambda: T.scaled_dot_product_attention_backward(
                g, q, q, q, out, lse, grads_out=(u, u[::-1], np.empty_like(q))))
            return
        got = T.scaled_dot_product_attention_backward(
            g, q, q, q, out, lse, grads_out=(g, np.empty_like(q), np.empty_like(q)))
        for a, w in zip(got, want):
            if not np.array_equal(a, w):
                raise Fail("grads_out over dout differs from separate arrays")
        return
    else:
        cache, twin = T.KVCache(1, 1, 8, n), T.KVCache(1, 1, 8, n)
        q4, k4 = q[None, :1, :1], q[None, 1:2, :1].copy()
        if kind == "cache_out_storage":
            e = Expect()
            e.add(BAD, {"out"}, (InvalidParameterError,))
            before = cache.k.copy()
            run_expecting(e, lambda: cache.attend(q4, k4, k4, out=cache.k[:, :, :1]))
            if cache.lengths[0] != 0 or not np.array_equal(before, cache.k):
                raise Fail("a refused attend changed the cache")
            return
        q4 = q4.copy()
        want = twin.attend(q4.copy(), k4, k4)
        got = cache.attend(q4, k4, k4, out=q4)
    if not np.array_equal(got, want):
        raise Fail(f"{kind}: differs from the same call on separate arrays")
