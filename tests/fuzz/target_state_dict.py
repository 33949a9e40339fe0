"""Fuzz target: MultiHeadAttention.load_state_dict, with one entry dropped,
added, reshaped or retyped, in tileattn's or torch's (in_proj) naming; a
refused load must leave the module as it was."""

from __future__ import annotations

import numpy as np
import tileattn
from hypothesis import strategies as st
from tileattn import DTypeError, InvalidParameterError, ShapeError

from .harness import BAD, Expect, Fail, must_have_raised, run_expecting, start_case


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
    start_case(c)
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
