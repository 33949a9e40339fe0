"""bfloat16 arrays (ml_dtypes.bfloat16) at the functional API and as module
inputs: computed in float32, as float16 is, and returned in bf16."""

import ml_dtypes
import numpy as np
import pytest

import tileattn
from tileattn._errors import DTypeError
from conftest import make_qkv

BF16 = ml_dtypes.bfloat16


def widened(*arrays):
    return tuple(a.astype(np.float32) for a in arrays)


@pytest.mark.parametrize("kwargs", [
    {}, {"is_causal": True}, {"window": 3}, {"mask": "bool"}, {"mask": "float"},
])
def test_attention_is_float32_attention_rounded(rng, kwargs):
    q, k, v = (a.astype(BF16) for a in make_qkv(rng, 2, 4, 2, 9, 13, 16))
    kwargs = dict(kwargs)
    mask = kwargs.pop("mask", None)
    if mask == "bool":
        kwargs["attn_mask"] = rng.random((9, 13)) < 0.7
    elif mask == "float":
        kwargs["attn_mask"] = rng.standard_normal((9, 13)).astype(BF16)
    out = tileattn.scaled_dot_product_attention(q, k, v, **kwargs)
    assert out.dtype == BF16 and out.shape == (2, 4, 9, 16)
    f32 = dict(kwargs)
    if mask == "float":
        f32["attn_mask"] = kwargs["attn_mask"].astype(np.float32)
    want = tileattn.scaled_dot_product_attention(*widened(q, k, v), **f32).astype(BF16)
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))


def test_out_argument_and_weights(rng):
    q, k, v = (a.astype(BF16) for a in make_qkv(rng, 1, 2, 2, 5, 6, 8))
    out = np.zeros((1, 2, 5, 8), BF16)
    res, w = tileattn.scaled_dot_product_attention(q, k, v, out=out, return_weights=True)
    assert res is out and w.dtype == BF16
    want, want_w = tileattn.scaled_dot_product_attention(*widened(q, k, v), return_weights=True)
    assert np.array_equal(out.astype(np.float32), want.astype(BF16).astype(np.float32))
    assert np.array_equal(w.astype(np.float32), want_w.astype(BF16).astype(np.float32))
    with pytest.raises(DTypeError, match="out: expected dtype bfloat16"):
        tileattn.scaled_dot_product_attention(q, k, v, out=np.zeros((1, 2, 5, 8), np.float32))


def test_backward_through_float32(rng):
    q, k, v = (a.astype(BF16) for a in make_qkv(rng, 1, 2, 2, 6, 7, 8))
    out, lse = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(BF16)
    grads = tileattn.scaled_dot_product_attention_backward(dout, q, k, v, out, lse,
                                                          is_causal=True)
    want = tileattn.scaled_dot_product_attention_backward(
        *widened(dout, q, k, v, out), lse, is_causal=True)
    for g, w in zip(grads, want):
        assert g.dtype == BF16
        assert np.array_equal(g.astype(np.float32), w.astype(BF16).astype(np.float32))


def test_module_inputs(rng):
    x = rng.standard_normal((3, 5, 16)).astype(BF16)
    lin = tileattn.Linear(16, 8, rng=rng)
    assert np.array_equal(lin(x), lin(x.astype(np.float32)))
    mha = tileattn.MultiHeadAttention(16, 2)
    first = lambda r: r[0] if isinstance(r, tuple) else r  # noqa: E731
    y = first(mha(x, x, x))
    x32 = x.astype(np.float32)
    assert y.dtype == BF16
    assert np.array_equal(y.astype(np.float32),
                          first(mha(x32, x32, x32)).astype(BF16).astype(np.float32))


def test_other_dtypes_name_bfloat16_in_the_error(rng):
    q = np.zeros((2, 3, 4), np.int32)
    with pytest.raises(DTypeError, match="q: expected float16, bfloat16, float32 or float64"):
        tileattn.scaled_dot_product_attention(q, q, q)


def test_state_dict_values_may_be_bf16(rng):
    """A checkpoint stored in bf16 loads into a float32 module (widened)."""
    lin = tileattn.Linear(6, 4, rng=rng)
    sd = {k: v.astype(BF16) for k, v in lin.state_dict().items()}
    lin.load_state_dict(sd)
    np.testing.assert_array_equal(lin.weight, sd["weight"].astype(np.float32))
