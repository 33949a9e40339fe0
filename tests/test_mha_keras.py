"""MultiHeadAttention with Keras weights against a float64 einsum reference of
Keras' MultiHeadAttention: call order (query, value, key), value_dim !=
key_dim, output_shape, attention_axes over several axes of 4-D inputs."""

import numpy as np
import pytest

import tileattn
from conftest import close


def keras_weights(rng, q_feat, k_feat, v_feat, heads, key_dim, value_dim, out_dim):
    """Random weights in Keras' shapes, in layer.get_weights() order."""
    def r(*s):
        return rng.standard_normal(s) * 0.3
    return [r(q_feat, heads, key_dim), r(heads, key_dim),
            r(k_feat, heads, key_dim), r(heads, key_dim),
            r(v_feat, heads, value_dim), r(heads, value_dim),
            r(heads, value_dim, out_dim), r(out_dim)]


def softmax(s, axes):
    s = s - s.max(axis=axes, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=axes, keepdims=True)


def keras_reference(query, value, key, w, batch="b", q_axes="t", k_axes="s", mask=None):
    """Keras' MultiHeadAttention as float64 einsums, built as Keras builds them
    from one einsum letter per axis: `batch` for the axes query and key/value
    share (the batch axis and any axis not attended over), `q_axes` / `k_axes`
    for the attended axes of the query and of key/value; the softmax runs over
    all of k_axes. The default letters are (B, T, dim) inputs. mask: batch +
    q_axes + k_axes axes, 1 = attend."""
    wq, bq, wk, bk, wv, bv, wo, bo = w
    qi, ki, si = batch + q_axes, batch + k_axes, batch + "h" + q_axes + k_axes
    q = np.einsum(f"{qi}e,ehd->{qi}hd", query, wq) + bq
    k = np.einsum(f"{ki}e,ehd->{ki}hd", key, wk) + bk
    v = np.einsum(f"{ki}e,ehd->{ki}hd", value, wv) + bv
    s = np.einsum(f"{qi}hd,{ki}hd->{si}", q / np.sqrt(wq.shape[-1]), k)
    if mask is not None:   # Keras adds a large negative number
        s = np.where(np.expand_dims(mask, len(batch)), s, -1e9)
    p = softmax(s, axes=tuple(range(-len(k_axes), 0)))
    o = np.einsum(f"{si},{ki}hd->{qi}hd", p, v)
    return np.einsum(f"{qi}hd,hdo->{qi}o", o, wo) + bo, p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_attention_keras_order_value_dim_output_shape(rng, dtype):
    """Keras: layer(query, value, key); tileattn: mha(query, key, value)."""
    heads, key_dim, value_dim, out = 3, 8, 5, 7
    w = keras_weights(rng, 12, 10, 6, heads, key_dim, value_dim, out)
    query, value, key = (rng.standard_normal(s) for s in ((2, 9, 12), (2, 15, 6), (2, 15, 10)))
    want, want_p = keras_reference(query, value, key, w)
    m = tileattn.MultiHeadAttention(12, heads, head_dim=key_dim, value_dim=value_dim, kdim=10,
                                    vdim=6, output_dim=out, dtype=dtype)
    tileattn.load_keras_weights(m, w)
    y, p = m(query.astype(dtype), key.astype(dtype), value.astype(dtype), need_weights=True,
             average_attn_weights=False)
    close(y, want, dtype)
    close(p, want_p, dtype)


def test_self_attention_with_keras_mask(rng):
    heads, key_dim = 2, 6
    w = keras_weights(rng, 16, 16, 16, heads, key_dim, key_dim, 16)
    x = rng.standard_normal((2, 11, 16))
    mask = rng.random((2, 11, 11)) < 0.7
    mask[..., 0] = True
    want, _ = keras_reference(x, x, x, w, mask=mask)
    m = tileattn.MultiHeadAttention(16, heads, head_dim=key_dim, dtype=np.float64)
    m.load_state_dict(tileattn.keras_state_dict(w))
    close(m(x, attn_mask=mask[:, None]), want, np.float64)   # Keras' (B, T, S) gets a head axis


def test_keras_variable_paths_mapping(rng):
    w = keras_weights(rng, 8, 8, 8, 2, 4, 4, 8)
    names = [f"multi_head_attention/{p}/{k}" for p in ("query", "key", "value", "attention_output")
             for k in ("kernel", "bias")]
    a = tileattn.keras_state_dict(w)
    b = tileattn.keras_state_dict(dict(zip(names, w)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_keras_without_bias(rng):
    w = keras_weights(rng, 8, 8, 8, 2, 4, 4, 8)
    kernels = w[0::2]
    m = tileattn.MultiHeadAttention(8, 2, bias=False, dtype=np.float64)
    m.load_state_dict(tileattn.keras_state_dict(kernels))
    x = rng.standard_normal((1, 5, 8))
    want, _ = keras_reference(x, x, x, [kernels[0], 0, kernels[1], 0, kernels[2], 0,
                                        kernels[3], 0])
    close(m(x), want, np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_axes_1_2_on_4d(rng, dtype):
    heads, key_dim = 2, 4
    w = keras_weights(rng, 6, 6, 6, heads, key_dim, key_dim, 6)
    query, value = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((2, 4, 2, 6))
    # attention_axes=(1, 2): two attended axes on each side
    want, want_p = keras_reference(query, value, value, w, q_axes="ij", k_axes="kl")
    m = tileattn.MultiHeadAttention(6, heads, head_dim=key_dim, attention_axes=(1, 2), dtype=dtype)
    tileattn.load_keras_weights(m, w)
    y, p = m(query.astype(dtype), value.astype(dtype), need_weights=True,
             average_attn_weights=False)
    close(y, want, dtype)
    assert p.shape == (2, heads, 3, 5, 4, 2)
    close(p, want_p, dtype)
    # attention_axes=None attends over all inner axes: the same thing here
    m2 = tileattn.MultiHeadAttention(6, heads, head_dim=key_dim, dtype=dtype)
    tileattn.load_keras_weights(m2, w)
    close(m2(query.astype(dtype), value.astype(dtype)), want, dtype)


def test_attention_axis_2_on_4d(rng):
    heads, key_dim = 2, 4
    w = keras_weights(rng, 6, 6, 6, heads, key_dim, key_dim, 3)
    query, value = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((2, 3, 7, 6))
    # attention_axes=(2,): axis 1 is one more batch axis
    want, want_p = keras_reference(query, value, value, w, batch="bi", q_axes="j", k_axes="l")
    m = tileattn.MultiHeadAttention(6, heads, head_dim=key_dim, output_dim=3, attention_axes=-2,
                                    dtype=np.float64)
    tileattn.load_keras_weights(m, w)
    y, p = m(query, value, need_weights=True, average_attn_weights=False)
    close(y, want, np.float64)
    assert p.shape == (2, 3, heads, 5, 7)
    close(p, want_p, np.float64)
    _, p_avg = m(query, value, need_weights=True)
    close(p_avg, want_p.mean(axis=2), np.float64)


def test_attention_axes_errors():
    m = tileattn.MultiHeadAttention(6, 2, attention_axes=(3,))
    with pytest.raises(tileattn.InvalidParameterError, match=r"axis 3 .*shape \(2, 3, 5, 6\)"):
        m(np.zeros((2, 3, 5, 6), np.float32))
    with pytest.raises(tileattn.InvalidParameterError, match="attention_axes"):
        tileattn.MultiHeadAttention(6, 2, attention_axes="x")
    m = tileattn.MultiHeadAttention(6, 2, attention_axes=(1,))
    with pytest.raises(tileattn.ShapeError, match="non-attended axes"):
        m(np.zeros((2, 3, 5, 6), np.float32), np.zeros((2, 3, 4, 6), np.float32))
    with pytest.raises(tileattn.InvalidParameterError, match="8 arrays"):
        tileattn.keras_state_dict([np.zeros((2, 2, 2))] * 5)
    with pytest.raises(tileattn.ShapeError, match=r"query kernel: expected 3 axes"):
        tileattn.keras_state_dict([np.zeros((2, 2))] * 4)
