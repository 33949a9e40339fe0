"""GQA, rope, qk_norm, dropout, the fused projection and constructor/call
errors of MultiHeadAttention, against a float64 reference written here."""

import numpy as np
import pytest

import tileattn
from tileattn import DTypeError, InvalidParameterError, ShapeError
from tileattn import _call as call_module  # the forward every attention call runs

TOL = {np.float32: 1e-5, np.float64: 1e-12}


def ref_rope(x, theta):
    """Rotate-half RoPE via complex numbers: (x1 + i x2) * exp(i p w), x (B, L, H, D)."""
    d = x.shape[-1]
    w = theta ** (-np.arange(d // 2) * 2.0 / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * np.arange(x.shape[1])[:, None, None] * w)
    return np.concatenate([z.real, z.imag], axis=-1)


def ref_layer_norm(x, weight, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + (0 if bias is None else bias)


def reference(m, query, kv, causal=False):
    """float64 multi-head attention from m's parameters, repeating k/v heads for GQA."""
    p = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    query, kv = query.astype(np.float64), kv.astype(np.float64)

    def lin(x, name):
        return x @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0)

    b, lq, _ = query.shape
    lk = kv.shape[1]
    q = lin(query, "q_proj").reshape(b, lq, m.num_heads, m.head_dim)
    k = lin(kv, "k_proj").reshape(b, lk, m.num_kv_heads, m.head_dim)
    v = lin(kv, "v_proj").reshape(b, lk, m.num_kv_heads, m.value_dim)
    if m.qk_norm:
        q = ref_layer_norm(q, p["q_norm.weight"], p.get("q_norm.bias"))
        k = ref_layer_norm(k, p["k_norm.weight"], p.get("k_norm.bias"))
    if m.rope:
        q, k = ref_rope(q, m.rope_theta), ref_rope(k, m.rope_theta)
    group = m.num_heads // m.num_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(m.head_dim)
    if causal:
        s = np.where(np.tril(np.ones((lq, lk), bool), k=lk - lq), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("bhqk,bkhd->bqhd", s / s.sum(-1, keepdims=True), v).reshape(b, lq, -1)
    return lin(o, "out_proj")


def close(got, want, dtype):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want))), 1.0)
    err = float(np.max(np.abs(got.astype(np.float64) - want)))
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} > {TOL[dtype]:g} x {scale:.3g}"


def randomize(m, rng):
    """Non-trivial norm weights and biases, so that a skipped one shows."""
    sd = {k: rng.standard_normal(v.shape) * (0.3 if "bias" in k else 1.0) + ("norm.weight" in k)
          for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    return m


CASES = [
    dict(num_kv_heads=2),                              # GQA
    dict(num_kv_heads=1),                              # MQA
    dict(rope=True),
    dict(rope=True, rope_theta=500.0, num_kv_heads=2),
    dict(qk_norm=True),
    dict(qk_norm=True, rope=True, num_kv_heads=2, value_dim=6),
    dict(qk_norm=True, bias=False, head_dim=10),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("causal", [False, True])
def test_against_reference(rng, dtype, opts, causal):
    m = randomize(tileattn.MultiHeadAttention(32, 4, dtype=dtype, seed=3, **opts), rng)
    x = rng.standard_normal((2, 19, 32)).astype(dtype)
    close(m(x, is_causal=causal), reference(m, x, x, causal), dtype)


def test_gqa_cross_attention(rng):
    m = randomize(tileattn.MultiHeadAttention(32, 8, num_kv_heads=2, dtype=np.float64), rng)
    q, kv = rng.standard_normal((2, 5, 32)), rng.standard_normal((2, 12, 32))
    close(m(q, kv), reference(m, q, kv), np.float64)
    assert m.k_proj.weight.shape == (2 * 4, 32)


def test_self_attention_is_one_fused_matmul(rng, monkeypatch):
    """Self-attention does not call the separate q/k/v projections, and the core
    gets strided views of the fused projection (no copies)."""
    m = tileattn.MultiHeadAttention(32, 4, seed=0)
    calls, seen = [], {}
    real_forward = tileattn.Linear.forward
    monkeypatch.setattr(tileattn.Linear, "forward",
                        lambda self, x, **kw: calls.append(self) or real_forward(self, x, **kw))
    real_forward_call = call_module.forward

    def spy(call, **kw):
        x = call.inputs
        seen.update(q=x.q, k=x.k, v=x.v, out=kw["out"])
        return real_forward_call(call, **kw)

    monkeypatch.setattr(call_module, "forward", spy)
    m(rng.standard_normal((2, 7, 32)).astype(np.float32))
    assert calls == [m.out_proj]
    assert seen["q"].shape == (2, 4, 7, 8)
    root = [a for a in (seen[n] for n in "qkv")]
    for i, a in enumerate(root):
        while a.base is not None:
            a = a.base
        root[i] = a
    assert root[0] is root[1] is root[2]             # q, k, v: views of one projection
    assert not seen["q"].flags.c_contiguous
    assert not seen["out"].flags.c_contiguous        # (B, L, H, Dv) buffer seen as (B, H, L, Dv)


def test_packed_weights_follow_loads_and_edits(rng):
    m = tileattn.MultiHeadAttention(16, 2, seed=0, dtype=np.float64)
    x = rng.standard_normal((1, 6, 16))
    with pytest.raises(ValueError, match="read-only"):
        m.q_proj.weight[:] *= 2.0                   # handed out read-only: never stale
    with m.editing():
        m.q_proj.weight[:] *= 2.0                   # in-place edit, seen after the block
    m.k_proj.weight = rng.standard_normal((16, 16))  # assignment copies in
    m.load_state_dict({"v_proj.bias": np.ones(16)}, strict=False)
    close(m(x), reference(m, x, x), np.float64)
    # the separate (unfused) path gives the same
    close(m(x, x.copy(), x.copy()), reference(m, x, x), np.float64)


def test_dropout_only_in_training_and_reproducible(rng):
    x = rng.standard_normal((2, 9, 16)).astype(np.float32)
    m1 = tileattn.MultiHeadAttention(16, 2, dropout=0.5, seed=7)
    m2 = tileattn.MultiHeadAttention(16, 2, dropout=0.5, seed=7)
    plain = tileattn.MultiHeadAttention(16, 2, seed=7)
    np.testing.assert_array_equal(m1(x), plain(x))                      # eval: no dropout
    a, b = m1(x, training=True), m2(x, training=True)
    np.testing.assert_array_equal(a, b)                                 # same seed, same masks
    assert not np.allclose(a, plain(x))
    assert not np.array_equal(m1(x, training=True), a)                  # a new mask per call


def test_output_dtype_follows_input(rng):
    m = tileattn.MultiHeadAttention(16, 2, seed=0)
    x = rng.standard_normal((3, 16))
    y = m(x)                                                # float64 in, float32 module
    assert y.dtype == np.float64 and y.shape == (3, 16)
    np.testing.assert_allclose(y, m(x.astype(np.float32)), rtol=0, atol=0)
    assert m(x.astype(np.float16)).dtype == np.float16


def test_init_glorot_and_zero_bias():
    m = tileattn.MultiHeadAttention(64, 4, num_kv_heads=2, seed=0)
    w = m.k_proj.weight
    limit = np.sqrt(6.0 / (64 + 32))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.9 * limit
    assert all(np.all(p == 0) for n, p in m.named_parameters() if n.endswith("bias"))
    same = tileattn.MultiHeadAttention(64, 4, num_kv_heads=2, seed=0)
    np.testing.assert_array_equal(same.q_proj.weight, m.q_proj.weight)
    assert not np.array_equal(tileattn.MultiHeadAttention(64, 4, seed=1).q_proj.weight,
                              m.q_proj.weight)


@pytest.mark.parametrize("kw, err, pattern", [
    (dict(embed_dim=10, num_heads=3), InvalidParameterError, r"embed_dim \(10\).*num_heads \(3\)"),
    (dict(embed_dim=16, num_heads=8, num_kv_heads=3), InvalidParameterError,
     r"num_heads \(8\).*num_kv_heads \(3\)"),
    (dict(embed_dim=12, num_heads=4, rope=True), InvalidParameterError, r"head_dim=3"),
    (dict(embed_dim=0, num_heads=1), InvalidParameterError, r"embed_dim.*got 0"),
    (dict(embed_dim=8, num_heads=2, dropout=1.0), InvalidParameterError, r"dropout.*1\.0"),
    (dict(embed_dim=8, num_heads=2, dtype=np.int32), DTypeError, r"dtype.*int32"),
    (dict(embed_dim=8, num_heads=2, rope_theta=-1.0), InvalidParameterError, r"rope_theta"),
    (dict(embed_dim=8, num_heads=2, rope=True, attention_axes=(1, 2)), InvalidParameterError,
     r"rope"),
])
def test_constructor_errors(kw, err, pattern):
    with pytest.raises(err, match=pattern):
        tileattn.MultiHeadAttention(**kw)


def test_head_dim_lifts_divisibility():
    m = tileattn.MultiHeadAttention(10, 3, head_dim=4)
    assert m.q_proj.weight.shape == (12, 10) and m.out_proj.weight.shape == (10, 12)


def test_call_errors():
    m = tileattn.MultiHeadAttention(16, 2, kdim=8)
    x = np.zeros((2, 5, 16), np.float32)
    with pytest.raises(ShapeError, match=r"query: expected last axis 16 \(embed_dim\), got shape \(2, 5, 12\)"):
        m(np.zeros((2, 5, 12), np.float32), np.zeros((2, 5, 8), np.float32))
    with pytest.raises(ShapeError, match=r"key: expected last axis 8 \(kdim\)"):
        m(x)
    with pytest.raises(ShapeError, match=r"value: expected last axis 16 \(vdim\)"):
        m(x, np.zeros((2, 4, 8), np.float32), np.zeros((2, 4, 9), np.float32))
    with pytest.raises(ShapeError, match=r"query: expected .* got shape \(16,\)"):
        m(np.zeros(16, np.float32))
    with pytest.raises(DTypeError, match=r"query: expected float.*int64"):
        m(np.zeros((2, 5, 16), np.int64))
    m = tileattn.MultiHeadAttention(16, 2)
    with pytest.raises(ShapeError, match="batch"):
        m(x, np.zeros((3, 4, 16), np.float32))
    with pytest.raises(ShapeError, match="key and value"):
        m(x, np.zeros((2, 4, 16), np.float32), np.zeros((2, 6, 16), np.float32))
    with pytest.raises(ShapeError, match="attn_mask"):
        m(x, attn_mask=np.ones((3, 5, 5), bool))
    with pytest.raises(InvalidParameterError, match="training"):
        m(x, training=1)
    with pytest.raises(InvalidParameterError, match="cache"):
        m(x, cache=object())


def test_window_and_unbatched_weights_match_explicit_masks(rng):
    """window= and is_causal reach the core: same as the equivalent bool mask."""
    m = tileattn.MultiHeadAttention(16, 2, seed=0, dtype=np.float64)
    x = rng.standard_normal((9, 16))                                 # unbatched
    i, j = np.arange(9)[:, None], np.arange(9)[None, :]
    band = (j <= i) & (j > i - 3)
    y, w = m(x, window=3, need_weights=True, average_attn_weights=False)
    y2, w2 = m(x, attn_mask=band, need_weights=True, average_attn_weights=False)
    assert y.shape == (9, 16) and w.shape == (2, 9, 9)
    np.testing.assert_allclose(y, y2, rtol=0, atol=1e-14)
    np.testing.assert_allclose(w, w2, rtol=0, atol=1e-15)
    assert np.all(w[:, ~band] == 0)


def test_replacing_a_projection_repacks(rng):
    m = tileattn.MultiHeadAttention(16, 2, seed=0, dtype=np.float64)
    x = rng.standard_normal((1, 6, 16))
    m.k_proj = tileattn.Linear(16, 16, dtype=np.float64, rng=rng)
    assert np.shares_memory(m.k_proj.weight, m.projections.in_weight)
    close(m(x), reference(m, x, x), np.float64)
    with pytest.raises(ShapeError, match=r"k_proj: expected Linear\(16, 16, bias=True\), got Linear\(16, 8"):
        m.k_proj = tileattn.Linear(16, 8, dtype=np.float64)
