"""Property sweep of the backward: the forward sweep's random shapes, GQA
ratios, masks, dropout and dtypes (test_hypothesis.cases), gradients against
the dense oracle."""

import numpy as np
from hypothesis import HealthCheck, given, settings

import tileattn
from grad_reference import attention_grads, check_grad
from test_hypothesis import cases

sdpa = tileattn.scaled_dot_product_attention
sdpa_bwd = tileattn.scaled_dot_product_attention_backward


def check_case(q, k, v, kw):
    float_mask = "attn_mask" in kw and kw["attn_mask"].dtype != bool
    out, lse = sdpa(q, k, v, return_lse=True, **kw)
    dout = np.random.default_rng(q.size).standard_normal(out.shape).astype(q.dtype)
    got = sdpa_bwd(dout, q, k, v, out, lse, return_mask_grad=float_mask, **kw)
    oracle = attention_grads(dout, q, k, v, **kw)
    plain = attention_grads(dout, q, k, v, dtype=q.dtype.type, **kw)
    for name, g, o, p, m in zip(("dq", "dk", "dv"), got, oracle[1:4], plain[1:4], oracle[5]):
        check_grad(name, g, o, p, m)
    if float_mask:
        shape = kw["attn_mask"].shape

        def reduce(ds):
            lead = 4 - len(shape)
            ds = ds.sum(axis=tuple(range(lead))) if lead else ds
            axes = tuple(i for i, n in enumerate(shape) if n == 1)
            return ds.sum(axis=axes, keepdims=True).reshape(shape)

        check_grad("dmask", got[3], reduce(oracle[4]), reduce(plain[4]), reduce(oracle[5][3]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_gradients_match_reference(case):
    check_case(*case)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_every_isa_path_gradients(case):
    before = tileattn._core.isa()
    try:
        for isa in tileattn._core.isas_supported():
            tileattn._core.set_isa(isa)
            check_case(*case)
    finally:
        tileattn._core.set_isa(before)
