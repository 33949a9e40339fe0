"""Property sweep: random shapes, GQA ratios, masks and dtypes against the
float64 oracle."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tileattn
from reference import assert_close_to_reference

sdpa = tileattn.scaled_dot_product_attention

lengths = st.sampled_from([1, 2, 7, 31, 63, 64, 65, 95, 96, 97, 128, 191, 192, 193, 257])
head_dims = st.sampled_from([1, 3, 8, 16, 32, 64, 80, 128])


@st.composite
def cases(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    lq, lk = draw(lengths), draw(lengths)
    d, dv = draw(head_dims), draw(st.one_of(st.none(), head_dims))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    hq = hkv * group
    dv = d if dv is None else dv
    q = rng.standard_normal((b, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((b, hkv, lk, d)).astype(dtype)
    v = rng.standard_normal((b, hkv, lk, dv)).astype(dtype)
    kw = {}
    if draw(st.booleans()):
        kw["is_causal"] = True
    window = draw(st.one_of(st.none(), st.integers(1, 300),
                            st.tuples(st.integers(-1, 200), st.integers(-1, 200))))
    if window is not None:
        kw["window"] = window
    mask_kind = draw(st.sampled_from([None, "bool", "float"]))
    if mask_kind:
        shape = draw(st.sampled_from([(lq, lk), (b, 1, 1, lk), (b, hq, lq, lk), (1, hq, 1, lk)]))
        if mask_kind == "bool":
            kw["attn_mask"] = rng.random(shape) < draw(st.floats(0.05, 1.0))
        else:
            m = rng.standard_normal(shape)
            m[rng.random(shape) < 0.2] = -np.inf
            kw["attn_mask"] = m.astype(dtype)
    if draw(st.booleans()):
        kw["key_padding_mask"] = rng.random((b, lk)) < draw(st.floats(0.05, 1.0))
    if draw(st.integers(0, 4)) == 0:
        kw["dropout_p"] = draw(st.floats(0.0, 0.9))
        kw["seed"] = seed
    return q, k, v, kw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_matches_reference(case):
    q, k, v, kw = case
    out = sdpa(q, k, v, **kw)
    assert np.isfinite(out).all()
    assert_close_to_reference(out, q, k, v, **kw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_isa_path_matches_reference(case):
    q, k, v, kw = case
    before = tileattn._core.isa()
    try:
        for isa in tileattn._core.isas_supported():
            tileattn._core.set_isa(isa)
            assert_close_to_reference(sdpa(q, k, v, **kw), q, k, v, **kw)
    finally:
        tileattn._core.set_isa(before)
