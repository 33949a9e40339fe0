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
