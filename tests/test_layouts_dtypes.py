"""dtypes (float16 in, float16 out), strided and odd memory layouts, out=."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from reference import assert_close_to_reference

sdpa = tileattn.scaled_dot_product_attention


def test_float16_inputs(rng):
    q, k, v = make_qkv(rng, 2, 4, 2, 70, 130, 32, dtype=np.float16)
    out, w = sdpa(q, k, v, is_causal=True, return_weights=True)
    assert out.dtype == np.float16 and w.dtype == np.float16
    assert_close_to_reference(out, q, k, v, is_causal=True)


def test_float16_mask(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 30, 30, 16, dtype=np.float16)
    mask = rng.standard_normal((30, 30)).astype(np.float16)
    assert_close_to_reference(sdpa(q, k, v, attn_mask=mask), q, k, v, attn_mask=mask)


def test_output_dtype_follows_input(rng):
    for dt in (np.float32, np.float64):
        q, k, v = make_qkv(rng, 1, 1, 1, 4, 4, 4, dtype=dt)
        assert sdpa(q, k, v).dtype == dt


def test_transposed_views(each_isa, rng):
    """(B, L, H, D) activations viewed as (B, H, L, D) without a copy."""
    x = rng.standard_normal((2, 90, 4, 32)).astype(np.float32)
    q = x.transpose(0, 2, 1, 3)
    k = np.ascontiguousarray(x[:, ::-1]).transpose(0, 2, 1, 3)
    assert not q.flags.c_contiguous
    assert_close_to_reference(sdpa(q, k, q, is_causal=True), q, k, q, is_causal=True)


def test_sliced_negative_and_inner_strides(each_isa, rng):
    big = rng.standard_normal((2, 3, 400, 64))
    q = big[:, :, ::3, ::2]             # strided rows and a strided last axis
    k = big[:, :, ::-2, 1::2]           # negative row stride
    v = big[:, :, 1::2, :40]
    assert_close_to_reference(sdpa(q, k, v), q, k, v)


def test_broadcast_zero_stride_kv(rng):
    k = np.broadcast_to(rng.standard_normal((1, 1, 50, 16)), (3, 2, 50, 16))
    q = rng.standard_normal((3, 2, 20, 16))
    assert_close_to_reference(sdpa(q, k, k), q, k, k)


def test_unaligned_buffer(rng):
    raw = np.zeros(4 * 2 * 30 * 8 + 1, dtype=np.uint8)[1:]
    q = raw[: 4 * 2 * 30 * 8 // 8 * 8].view(np.float32)[: 2 * 30 * 8].reshape(1, 2, 30, 8)
    assert not q.flags.aligned
    q[...] = rng.standard_normal(q.shape)
    assert_close_to_reference(sdpa(q, q, q), q, q, q)


def test_read_only_inputs(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 10, 8)
    for a in (q, k, v):
        a.flags.writeable = False
    assert_close_to_reference(sdpa(q, k, v), q, k, v)


def test_python_lists(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 3, 4, 2, dtype=np.float64)
    out = sdpa(q.tolist(), k.tolist(), v.tolist())
    assert out.dtype == np.float64
    assert_close_to_reference(out, q, k, v)


def test_out_contiguous_and_strided(rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 40, 50, 16)
    want = sdpa(q, k, v)
    out = np.empty_like(want)
    assert sdpa(q, k, v, out=out) is out
    np.testing.assert_array_equal(out, want)
    backing = np.zeros((2, 40, 2, 16), np.float32)
    view = backing.transpose(0, 2, 1, 3)
    assert sdpa(q, k, v, out=view) is view
    np.testing.assert_array_equal(view, want)


def test_out_aliasing_an_input(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 300, 300, 16)
    want = sdpa(q, k, v)
    sdpa(q, k, v, out=v)
    np.testing.assert_array_equal(v, want)


def test_out_float16(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 10, 8, dtype=np.float16)
    out = np.empty((1, 2, 10, 8), np.float16)
    assert sdpa(q, k, v, out=out) is out
    np.testing.assert_array_equal(out, sdpa(q, k, v))


@pytest.mark.parametrize("bad", [np.float64, np.float16])
def test_out_dtype_must_match(rng, bad):
    q, k, v = make_qkv(rng, 1, 2, 2, 10, 10, 8)
    with pytest.raises(tileattn.DTypeError, match="out"):
        sdpa(q, k, v, out=np.empty((1, 2, 10, 8), bad))
