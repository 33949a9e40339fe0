"""KVCache(dtype=bfloat16): half the bytes of a float32 cache, keys and
values rounded to bf16 as they are appended and widened exactly as the
kernel reads them, so the results are those of a float32 cache holding the
rounded values, bit for bit (prefill chunks and decode steps alike)."""

import ml_dtypes
import numpy as np
import pytest

import tileattn
from tileattn._errors import DTypeError

BF16 = ml_dtypes.bfloat16


def rounded(a):
    return a.astype(BF16).astype(np.float32)


@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 64), (3, 1, 48)])
def test_bf16_cache_equals_float32_cache_of_rounded_values(each_isa, rng, hq, hkv, d):
    b = 2
    caches = {"bf16": tileattn.KVCache(b, hkv, 400, d, dtype="bfloat16"),
              "f32": tileattn.KVCache(b, hkv, 400, d, dtype=np.float32)}
    assert caches["bf16"].k.dtype == BF16
    assert caches["bf16"].nbytes * 2 == caches["f32"].nbytes
    for t in (150, 1, 1, 3, 1):          # a prefill chunk, then decode steps
        q = rng.standard_normal((b, hq, t, d)).astype(np.float32)
        k = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
        v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
        got = caches["bf16"].attend(q, k, v)
        want = caches["f32"].attend(q, rounded(k), rounded(v))
        np.testing.assert_array_equal(got, want)


def test_mha_decodes_over_a_bf16_cache(rng):
    mha = tileattn.MultiHeadAttention(64, 4, num_kv_heads=2, rope=True, seed=0)
    x = rng.standard_normal((2, 12, 64)).astype(np.float32)
    outs = {}
    for dt in (np.float32, "bfloat16"):
        cache = tileattn.KVCache(2, 2, 32, 16, dtype=dt)
        steps = [mha(x[:, :8], cache=cache, is_causal=True)]
        steps += [mha(x[:, i:i + 1], cache=cache, is_causal=True) for i in range(8, 12)]
        outs[str(dt)] = np.concatenate(steps, axis=1)
    err = np.abs(outs["bfloat16"] - outs[str(np.float32)]).max()
    assert 0 < err < 0.05       # bf16's rounding of K and V, no more


def test_float64_module_refuses_a_bf16_cache():
    mha = tileattn.MultiHeadAttention(16, 2, dtype=np.float64)
    cache = tileattn.KVCache(1, 2, 8, 8, dtype="bfloat16")
    with pytest.raises(DTypeError, match="float64 module needs a float64 cache"):
        mha(np.zeros((1, 1, 16)), cache=cache)


@pytest.mark.parametrize("storage", [np.float32, np.float16, "bfloat16"])
def test_bf16_products_over_a_cache_are_those_of_the_functional_call(each_isa, rng, storage):
    """KVCache.attend(compute_dtype="bfloat16"), prefill chunk and decode
    steps, gives the bits of scaled_dot_product_attention with bf16
    products over the same keys and values (what the cache holds), on every
    path; and those are bf16 products, not float32 ones."""
    b, hq, hkv, d = 2, 8, 2, 64
    cache = tileattn.KVCache(b, hkv, 300, d, dtype=storage)
    keys = np.zeros((b, hkv, 0, d), np.float32)
    values = np.zeros((b, hkv, 0, d), np.float32)
    for t in (130, 1, 1, 4, 1):
        q, k, v = (rng.standard_normal((b, h, t, d)).astype(np.float32) for h in (hq, hkv, hkv))
        got = cache.attend(q, k, v, compute_dtype="bfloat16")
        stored = (lambda a: a.astype(cache.k.dtype).astype(np.float32))
        keys = np.concatenate([keys, stored(k)], axis=2)
        values = np.concatenate([values, stored(v)], axis=2)
        want = tileattn.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                     compute_dtype="bfloat16")
        np.testing.assert_array_equal(got, want)
        f32 = tileattn.scaled_dot_product_attention(q, keys, values, is_causal=True)
        assert 0 < np.abs(got - f32).max() < 0.05


def test_mha_with_bf16_products_decodes_with_bf16_products(rng):
    """A module's cached steps compute as its uncached calls do: each step
    equals the module over the whole prefix (last rows), to bf16 rounding,
    and differs from the float32 module's step."""
    kw = dict(num_kv_heads=2, rope=True, seed=0)
    bf = tileattn.MultiHeadAttention(64, 4, compute_dtype="bfloat16", **kw)
    f32 = tileattn.MultiHeadAttention(64, 4, **kw)
    x = rng.standard_normal((2, 12, 64)).astype(np.float32)
    caches = {m: tileattn.KVCache(2, 2, 32, 16) for m in ("bf", "f32")}
    bf(x[:, :8], cache=caches["bf"], is_causal=True)
    f32(x[:, :8], cache=caches["f32"], is_causal=True)
    for i in range(8, 12):
        step = bf(x[:, i:i + 1], cache=caches["bf"], is_causal=True)
        step32 = f32(x[:, i:i + 1], cache=caches["f32"], is_causal=True)
        whole = bf(x[:, :i + 1], is_causal=True)[:, -1:]
        assert np.abs(step - whole).max() < 0.02
        assert np.abs(step - step32).max() > 0


@pytest.mark.parametrize("group", [2, 3, 4, 8])
def test_a_group_decoded_with_bf16_products_keeps_hidden_non_finite_values_out(each_isa, rng,
                                                                              group):
    """The rows of a GQA group share each value vector in P V (bf16
    products over a float32 cache); keys a row cannot see (a window here)
    carry inf and NaN values, and segments where some row's weights are
    zero take the per-row skip: the outputs stay finite and match a float64
    reference of the rounded operands."""
    b, hkv, ctx, d = 2, 2, 300, 64
    hq = hkv * group
    cache = tileattn.KVCache(b, hkv, ctx + 1, d)
    k = rng.standard_normal((b, hkv, ctx, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, ctx, d)).astype(np.float32)
    v[:, :, :100:7] = np.inf
    v[:, :, 3:100:11] = np.nan
    k[:, :, 150:160] *= 40.0         # some rows' weights underflow to zero there
    cache.append(k, v)
    q = rng.standard_normal((b, hq, 1, d)).astype(np.float32)
    kn = rng.standard_normal((b, hkv, 1, d)).astype(np.float32)
    got = cache.attend(q, kn, kn, window=150, compute_dtype="bfloat16")
    assert np.isfinite(got).all()
    keys = np.concatenate([k, kn], axis=2)[:, :, -150:]
    values = np.concatenate([v, kn], axis=2)[:, :, -150:]
    kr, vr = np.repeat(rounded(keys), group, axis=1), np.repeat(rounded(values), group, axis=1)
    s = rounded(q) @ kr.transpose(0, 1, 3, 2) / np.sqrt(d)
    w = np.exp(s - s.max(-1, keepdims=True))
    want = (w / w.sum(-1, keepdims=True)) @ vr
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
