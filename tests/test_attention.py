"""The kernel against the float64 oracle on a grid of shapes around tile
boundaries, on every ISA path the CPU supports."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from reference import assert_close_to_reference

sdpa = tileattn.scaled_dot_product_attention

# Tile boundaries: 96 query rows per task; key blocks of 96..256 depending
# on dtype and head size; micro-tiles of 4..12 rows and 8..32 columns.
LENGTHS = [1, 7, 63, 64, 65, 96, 97, 191, 192, 193, 255, 256, 257, 300]
HEAD_DIMS = [1, 8, 32, 64, 80, 128, 256]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lq", LENGTHS)
def test_lengths_not_multiple_of_tiles(each_isa, rng, dtype, lq):
    lk = LENGTHS[(LENGTHS.index(lq) * 5 + 3) % len(LENGTHS)]  # pair with a varied Lk
    q, k, v = make_qkv(rng, 2, 2, 2, lq, lk, 32, dtype=dtype)
    assert_close_to_reference(sdpa(q, k, v), q, k, v)
    assert_close_to_reference(sdpa(q, k, v, is_causal=True), q, k, v, is_causal=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims(each_isa, rng, dtype, d):
    q, k, v = make_qkv(rng, 1, 3, 3, 97, 200, d, dtype=dtype)
    assert_close_to_reference(sdpa(q, k, v), q, k, v)


@pytest.mark.parametrize("d,dv", [(64, 32), (16, 80), (3, 5), (128, 1)])
def test_value_dim_differs(each_isa, rng, d, dv):
    q, k, v = make_qkv(rng, 2, 2, 1, 70, 130, d, dv)
    assert_close_to_reference(sdpa(q, k, v, is_causal=True), q, k, v, is_causal=True)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (8, 4), (8, 2), (8, 1), (6, 3)])
def test_grouped_query_attention(each_isa, rng, hq, hkv):
    q, k, v = make_qkv(rng, 2, hq, hkv, 33, 90, 16)
    assert_close_to_reference(sdpa(q, k, v), q, k, v)


def test_gqa_uses_shared_kv_head(rng):
    """Query heads 0-3 read KV head 0, heads 4-7 KV head 1 (not interleaved)."""
    q, k, v = make_qkv(rng, 1, 8, 2, 5, 9, 8)
    out = sdpa(q, k, v)
    for h in range(8):
        alone = sdpa(q[:, h : h + 1], k[:, h // 4 : h // 4 + 1], v[:, h // 4 : h // 4 + 1])
        np.testing.assert_array_equal(out[:, h : h + 1], alone)


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 500), (5, 3), (300, 40), (40, 300)])
def test_query_and_key_lengths_differ(each_isa, rng, lq, lk):
    q, k, v = make_qkv(rng, 1, 2, 2, lq, lk, 24)
    for causal in (False, True):
        assert_close_to_reference(sdpa(q, k, v, is_causal=causal), q, k, v, is_causal=causal)


def test_unbatched_input(rng):
    q, k, v = make_qkv(rng, 1, 4, 2, 20, 30, 16, batched=False)
    out = sdpa(q, k, v, is_causal=True)
    assert out.shape == (4, 20, 16)
    assert_close_to_reference(out, q, k, v, is_causal=True)
    np.testing.assert_array_equal(out, sdpa(q[None], k[None], v[None], is_causal=True)[0])


@pytest.mark.parametrize("scale", [0.0, 0.01, 1.0, 3.5, -0.7])
def test_explicit_scale(rng, scale):
    q, k, v = make_qkv(rng, 1, 2, 2, 40, 50, 16)
    assert_close_to_reference(sdpa(q, k, v, scale=scale), q, k, v, scale=scale)


def test_large_logits_softmax_stays_normalised(each_isa, rng):
    """Scores up to ~1e4 in magnitude: the running max keeps exp in range."""
    q, k, v = make_qkv(rng, 1, 2, 2, 50, 300, 32)
    q = q * 60.0
    v = np.ones_like(v)
    out = sdpa(q, k, v)
    np.testing.assert_allclose(out, 1.0, rtol=2e-6)
    assert_close_to_reference(sdpa(q, k, v), q, k, v)


def test_zero_sized_axes(rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 0, 5, 8)
    assert sdpa(q, k, v).shape == (2, 2, 0, 8)
    q, k, v = make_qkv(rng, 2, 2, 2, 4, 0, 8)
    out, w = sdpa(q, k, v, return_weights=True)
    assert out.shape == (2, 2, 4, 8) and not out.any() and w.shape == (2, 2, 4, 0)
    q, k, v = make_qkv(rng, 0, 2, 2, 4, 5, 8)
    assert sdpa(q, k, v).shape == (0, 2, 4, 8)
    q, k, v = make_qkv(rng, 1, 2, 2, 4, 5, 0, dv=3)
    assert_close_to_reference(sdpa(q, k, v), q, k, v)  # D = 0: uniform weights
    q, k, v = make_qkv(rng, 1, 2, 2, 4, 5, 6, dv=0)
    assert sdpa(q, k, v).shape == (1, 2, 4, 0)


def test_inputs_not_modified(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 100, 100, 16)
    copies = [a.copy() for a in (q, k, v)]
    sdpa(q, k, v, is_causal=True, dropout_p=0.3, seed=1, return_weights=True)
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)
