"""Attention with both products on bfloat16 operands
(compute_dtype="bfloat16"), on every ISA path.

The accuracy rule (flash-attention's): on inputs already rounded to bf16,
the error against a float64 reference is at most twice that of a
straightforward bf16 implementation (bf16 operands, float32 sums and
softmax, P rounded to bf16) on the same inputs."""

import ml_dtypes
import numpy as np
import pytest

import tileattn
from tileattn._errors import DTypeError
from conftest import make_qkv

BF16 = ml_dtypes.bfloat16


def to_bf16_values(*arrays):
    return tuple(a.astype(BF16).astype(np.float32) for a in arrays)


def visible(lq, lk, causal, window, mask, kpm):
    """(B or 1, 1 or Hq, Lq, Lk) bool: which keys each query sees."""
    i = np.arange(lq)[:, None] + lk - lq
    j = np.arange(lk)[None, :]
    vis = np.ones((lq, lk), bool)
    if causal:
        vis &= j <= i
    if window is not None:
        vis &= (j >= i - (window - 1)) & (j <= i)
    vis = vis[None, None]
    if mask is not None and mask.dtype == bool:
        vis = vis & mask
    if kpm is not None:
        vis = vis & kpm[:, None, None, :]
    return vis


def reference(q, k, v, scale, vis, additive, dtype, bf16_p):
    """softmax(q k^T * scale + mask) v with sums in `dtype`; bf16_p rounds P
    to bf16 before the P V product (the straightforward bf16 method)."""
    group = q.shape[1] // k.shape[1]
    k = np.repeat(k, group, axis=1).astype(dtype)
    v = np.repeat(v, group, axis=1).astype(dtype)
    s = np.einsum("bhid,bhjd->bhij", q.astype(dtype), k) * dtype(scale)
    if additive is not None:
        s = s + additive.astype(dtype)
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    p = e.astype(BF16).astype(dtype) if bf16_p else e
    o = np.einsum("bhij,bhjd->bhid", p, v)
    return np.where(l > 0, o / np.where(l > 0, l, 1), 0)


CASES = [
    dict(b=2, hq=4, hkv=4, lq=100, lk=300, d=64),
    dict(b=1, hq=4, hkv=2, lq=97, lk=513, d=128, causal=True),
    dict(b=2, hq=6, hkv=2, lq=33, lk=77, d=63, dv=40),
    dict(b=1, hq=2, hkv=1, lq=200, lk=200, d=32, window=37),
    dict(b=2, hq=4, hkv=2, lq=150, lk=600, d=48, window=70),  # two query blocks a head
    dict(b=2, hq=2, hkv=2, lq=40, lk=90, d=16, mask="bool"),
    dict(b=2, hq=2, hkv=2, lq=40, lk=91, d=16, mask="float"),
    dict(b=3, hq=4, hkv=4, lq=60, lk=250, d=64, kpm=True),
    dict(b=2, hq=8, hkv=2, lq=1, lk=1000, d=64),   # a decode step
    dict(b=1, hq=3, hkv=3, lq=5, lk=7, d=8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_error_at_most_twice_the_straightforward_bf16(each_isa, rng, case):
    c = dict(causal=False, window=None, mask=None, kpm=False, dv=None) | case
    q, k, v = to_bf16_values(*make_qkv(rng, c["b"], c["hq"], c["hkv"], c["lq"], c["lk"],
                                       c["d"], c["dv"]))
    scale = c["d"] ** -0.5
    mask = additive = kpm = None
    kwargs = {}
    if c["mask"] == "bool":
        mask = rng.random((c["b"], 1, c["lq"], c["lk"])) < 0.6
        kwargs["attn_mask"] = mask
    elif c["mask"] == "float":
        additive = rng.standard_normal((c["lq"], c["lk"])).astype(np.float32)
        kwargs["attn_mask"] = additive
    if c["kpm"]:
        kpm = rng.random((c["b"], c["lk"])) < 0.8
        kwargs["key_padding_mask"] = kpm
    if c["window"] is not None:
        kwargs["window"] = c["window"]
    out = tileattn.scaled_dot_product_attention(q, k, v, is_causal=c["causal"],
                                                compute_dtype="bfloat16", **kwargs)
    vis = visible(c["lq"], c["lk"], c["causal"], c["window"], mask, kpm)
    exact = reference(q, k, v, scale, vis, additive, np.float64, False)
    plain = reference(q, k, v, scale, vis, additive, np.float32, True)
    ours_err = np.max(np.abs(out - exact))
    plain_err = np.max(np.abs(plain - exact))
    assert ours_err <= 2 * plain_err, (ours_err, plain_err)
    # and the bf16 rounding is really there: float32 products are closer
    f32 = tileattn.scaled_dot_product_attention(q, k, v, is_causal=c["causal"], **kwargs)
    assert np.max(np.abs(f32 - exact)) < ours_err


def test_fully_masked_rows_are_zero(each_isa, rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 8, 30, 16)
    mask = np.ones((8, 30), bool)
    mask[3] = False
    out = tileattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, compute_dtype="bfloat16")
    assert np.all(out[:, :, 3] == 0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("lq,lk", [(20, 60), (150, 300)])
def test_non_finite_values_follow_float32(each_isa, rng, lq, lk):
    """A NaN or inf in a value a query cannot see stays out of its output;
    where it is seen, the output is not finite, as in float32."""
    q, k, v = make_qkv(rng, 1, 2, 2, lq, lk, 16)
    v[0, 0, lk - 10, 3] = np.nan
    v[0, 1, lk - 5, 7] = np.inf
    args = dict(is_causal=True)
    ours = tileattn.scaled_dot_product_attention(q, k, v, compute_dtype="bfloat16", **args)
    f32 = tileattn.scaled_dot_product_attention(q, k, v, **args)
    assert np.array_equal(np.isfinite(ours), np.isfinite(f32))
    assert not np.all(np.isfinite(ours)) and np.any(np.isfinite(ours[0, 0, :, 3]))


def test_bits_independent_of_threads_and_batch(each_isa, rng, restore_threads):
    q, k, v = make_qkv(rng, 3, 4, 2, 150, 260, 64)
    kwargs = dict(is_causal=True, compute_dtype="bfloat16")
    tileattn.set_num_threads(2)
    whole = tileattn.scaled_dot_product_attention(q, k, v, **kwargs)
    tileattn.set_num_threads(1)
    assert np.array_equal(tileattn.scaled_dot_product_attention(q, k, v, **kwargs), whole)
    tileattn.set_num_threads(2)
    for b in range(3):
        alone = tileattn.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                                                      **kwargs)
        assert np.array_equal(alone, whole[b:b + 1])


def test_bf16_arrays_in_and_out(rng):
    q, k, v = (a.astype(BF16) for a in make_qkv(rng, 1, 2, 2, 9, 17, 8))
    out = tileattn.scaled_dot_product_attention(q, k, v, compute_dtype="bfloat16")
    assert out.dtype == BF16
    want = tileattn.scaled_dot_product_attention(*(a.astype(np.float32) for a in (q, k, v)),
                                                 compute_dtype="bfloat16")
    assert np.array_equal(out.astype(np.float32), want.astype(BF16).astype(np.float32))


def test_weights_and_lse(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 9, 17, 8)
    out, w, lse = tileattn.scaled_dot_product_attention(
        q, k, v, compute_dtype="bfloat16", return_weights=True, return_lse=True)
    assert np.allclose(w.sum(-1), 1, atol=1e-5)
    assert np.allclose(lse, np.log(np.exp(
        np.einsum("bhid,bhjd->bhij", *to_bf16_values(q, k)) / np.sqrt(8)).sum(-1)), atol=1e-5)


@pytest.mark.parametrize("dtype,value,match", [
    (np.float64, "bfloat16", "take float32 computations"),
    (np.float32, "float16", "compute_dtype: expected"),
])
def test_bad_compute_dtype(rng, dtype, value, match):
    q = rng.standard_normal((2, 3, 4)).astype(dtype)
    with pytest.raises(DTypeError, match=match):
        tileattn.scaled_dot_product_attention(q, q, q, compute_dtype=value)


def test_dropout_keeps_the_float32_mask(each_isa, rng):
    """Dropout on the bf16 path drops the same weights as in float32 (the
    mask is a hash of the seed and the position), applied before rounding."""
    q, k, v = make_qkv(rng, 1, 2, 2, 20, 50, 16)
    kw = dict(dropout_p=0.3, seed=7, return_weights=True)
    out, w = tileattn.scaled_dot_product_attention(q, k, v, compute_dtype="bfloat16", **kw)
    out32, w32 = tileattn.scaled_dot_product_attention(q, k, v, **kw)
    np.testing.assert_array_equal(w == 0, w32 == 0)
    assert 0 < np.max(np.abs(out - out32)) < 0.05


def test_varlen_gives_each_sequence_its_own_bits(each_isa, rng):
    lengths = [5, 17, 130, 3]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    t = offsets[-1]
    q = rng.standard_normal((t, 4, 32)).astype(np.float32)
    k = rng.standard_normal((t, 2, 32)).astype(np.float32)
    v = rng.standard_normal((t, 2, 32)).astype(np.float32)
    out = tileattn.varlen_attention(q, k, v, offsets, is_causal=True, compute_dtype="bfloat16")
    for i in range(len(lengths)):
        s = slice(offsets[i], offsets[i + 1])
        alone = tileattn.scaled_dot_product_attention(
            q[s].transpose(1, 0, 2), k[s].transpose(1, 0, 2), v[s].transpose(1, 0, 2),
            is_causal=True, compute_dtype="bfloat16")
        np.testing.assert_array_equal(out[s], alone.transpose(1, 0, 2))


@pytest.mark.parametrize("storage", [np.float16, BF16])
def test_narrow_keys_and_values_round_like_their_float32_values(each_isa, rng, storage):
    """A float16 or bfloat16 cache read with bf16 products: K and V widened,
    then rounded to bf16, exactly as float32 arrays of the same values."""
    from tileattn import _core
    q, k, v = make_qkv(rng, 1, 4, 2, 3, 300, 64)
    kh, vh = k.astype(storage), v.astype(storage)
    opts = _core.AttentionOptions(scale=0.125, window_right=0, bf16=True)
    a, b = np.empty_like(q), np.empty_like(q)
    _core.attention_forward(q, kh, vh, a, opts)
    _core.attention_forward(q, kh.astype(np.float32), vh.astype(np.float32), b, opts)
    np.testing.assert_array_equal(a, b)
