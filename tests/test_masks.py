"""Every mask kind alone and combined, against the float64 oracle."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from reference import assert_close_to_reference, attention

sdpa = tileattn.scaled_dot_product_attention


def random_kpm(rng, b, lk, keep=0.7):
    kpm = rng.random((b, lk)) < keep
    kpm[:, 0] = True
    return kpm


@pytest.mark.parametrize("window", [1, 3, 64, 200, (5, 5), (0, 0), (-1, 10), (10, -1), (300, 2)])
@pytest.mark.parametrize("lq,lk", [(257, 257), (100, 400), (400, 100)])
def test_window(each_isa, rng, window, lq, lk):
    q, k, v = make_qkv(rng, 1, 2, 2, lq, lk, 16)
    out = sdpa(q, k, v, window=window)
    assert_close_to_reference(out, q, k, v, window=window)


@pytest.mark.parametrize("window", [(5, 5), (-1, 7)])
def test_window_and_causal(rng, window):
    q, k, v = make_qkv(rng, 1, 2, 2, 130, 130, 16)
    out = sdpa(q, k, v, window=window, is_causal=True)
    assert_close_to_reference(out, q, k, v, window=window, is_causal=True)


def test_int_window_implies_causal(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 70, 70, 8)
    np.testing.assert_array_equal(sdpa(q, k, v, window=70), sdpa(q, k, v, is_causal=True))


@pytest.mark.parametrize("shape", ["LqLk", "B111Lk", "BHqLqLk", "1HqLqLk", "Lk"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask_broadcasts(each_isa, rng, shape, kind):
    b, hq, lq, lk = 2, 3, 70, 150
    q, k, v = make_qkv(rng, b, hq, 3, lq, lk, 16)
    dims = {"LqLk": (lq, lk), "B111Lk": (b, 1, 1, lk), "BHqLqLk": (b, hq, lq, lk),
            "1HqLqLk": (1, hq, lq, lk), "Lk": (lk,)}[shape]
    if kind == "bool":
        mask = rng.random(dims) < 0.6
    else:
        mask = rng.standard_normal(dims).astype(np.float32)
        mask[rng.random(dims) < 0.3] = -np.inf
    out = sdpa(q, k, v, attn_mask=mask)
    assert_close_to_reference(out, q, k, v, attn_mask=mask)


def test_float64_mask_with_float32_inputs(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 30, 40, 8)
    mask = rng.standard_normal((30, 40))
    assert_close_to_reference(sdpa(q, k, v, attn_mask=mask), q, k, v, attn_mask=mask)


@pytest.mark.parametrize("lk", [5, 256, 300, 700])
def test_key_padding(each_isa, rng, lk):
    q, k, v = make_qkv(rng, 3, 2, 2, 50, lk, 32)
    kpm = random_kpm(rng, 3, lk)
    kpm[1, 10:] = False  # a short sequence: whole key blocks are padding
    out = sdpa(q, k, v, key_padding_mask=kpm)
    assert_close_to_reference(out, q, k, v, key_padding_mask=kpm)


def test_key_padding_accepts_tokenizer_integers(rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 9, 9, 8)
    ints = np.array([[1] * 9, [1] * 5 + [0] * 4], dtype=np.int64)
    np.testing.assert_array_equal(
        sdpa(q, k, v, key_padding_mask=ints), sdpa(q, k, v, key_padding_mask=ints.astype(bool))
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_masks_combined(each_isa, rng, dtype):
    b, hq, hkv, lq, lk = 2, 4, 2, 150, 333
    q, k, v = make_qkv(rng, b, hq, hkv, lq, lk, 32, dtype=dtype)
    kpm = random_kpm(rng, b, lk, 0.8)
    bmask = rng.random((b, 1, lq, lk)) < 0.8
    fmask = np.where(rng.random((lq, lk)) < 0.1, -np.inf, rng.standard_normal((lq, lk)))
    for mask in (bmask, fmask.astype(dtype)):
        kw = dict(attn_mask=mask, key_padding_mask=kpm, is_causal=True, window=(120, 3))
        out, w = sdpa(q, k, v, return_weights=True, **kw)
        assert_close_to_reference(out, q, k, v, weights=w, **kw)


def test_fully_masked_rows_give_zeros(each_isa, rng):
    b, h, lq, lk = 2, 2, 120, 300
    q, k, v = make_qkv(rng, b, h, h, lq, lk, 16)
    mask = np.ones((lq, lk), bool)
    mask[3] = False          # one row sees nothing
    mask[100:110] = False    # rows in the second query block too
    fmask = np.where(mask, 0.0, -np.inf).astype(np.float32)
    kpm = np.ones((b, lk), bool)
    kpm[1] = False           # batch item 1 has no real keys at all
    for kw in (dict(attn_mask=mask), dict(attn_mask=fmask), dict(key_padding_mask=kpm)):
        out, w = sdpa(q, k, v, return_weights=True, **kw)
        assert np.isfinite(out).all() and np.isfinite(w).all()
        want, want_w = attention(q, k, v, **kw)
        dead = ~want_w.any(axis=-1)
        assert dead.any()
        assert not out[dead].any() and not w[dead].any()
        assert_close_to_reference(out, q, k, v, weights=w, **kw)


def test_causal_with_more_queries_than_keys(rng):
    """Bottom-right alignment: the first Lq - Lk queries see no key."""
    q, k, v = make_qkv(rng, 1, 1, 1, 10, 4, 8)
    out = sdpa(q, k, v, is_causal=True)
    assert not out[0, 0, :6].any()
    assert_close_to_reference(out, q, k, v, is_causal=True)


def test_masked_prefix_then_visible_keys(each_isa, rng):
    """Rows fully masked in their first key block but not later."""
    q, k, v = make_qkv(rng, 1, 2, 2, 20, 600, 16)
    mask = np.zeros((20, 600), bool)
    mask[:, 550:] = True
    assert_close_to_reference(sdpa(q, k, v, attn_mask=mask), q, k, v, attn_mask=mask)


def test_single_visible_key(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 8, 300, 16)
    mask = np.zeros((8, 300), bool)
    mask[np.arange(8), rng.integers(0, 300, 8)] = True
    out = sdpa(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(out[0, 0], v[0, 0][mask.argmax(1)], rtol=1e-6)


def test_padding_invariance(each_isa, rng):
    """A sequence alone gives bitwise the same output as inside a padded batch."""
    q, k, v = make_qkv(rng, 1, 2, 2, 37, 37, 32)
    alone = sdpa(q, k, v)
    pad = 300
    qp, kp, vp = (np.concatenate([a, rng.standard_normal(a.shape[:2] + (pad, a.shape[3]))
                                  .astype(a.dtype)], axis=2) for a in (q, k, v))
    kpm = np.zeros((1, 37 + pad), bool)
    kpm[:, :37] = True
    padded = sdpa(qp, kp, vp, key_padding_mask=kpm)
    np.testing.assert_array_equal(padded[:, :, :37], alone)


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_dropout_matches_reference_mask(each_isa, rng, p):
    q, k, v = make_qkv(rng, 2, 2, 1, 100, 270, 16)
    out, w = sdpa(q, k, v, dropout_p=p, seed=7, is_causal=True, return_weights=True)
    assert_close_to_reference(out, q, k, v, weights=w, dropout_p=p, seed=7, is_causal=True)


def test_dropout_reproducible_for_a_seed(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 50, 50, 16)
    a = sdpa(q, k, v, dropout_p=0.2, seed=3)
    np.testing.assert_array_equal(a, sdpa(q, k, v, dropout_p=0.2, seed=3))
    assert not np.array_equal(a, sdpa(q, k, v, dropout_p=0.2, seed=4))


def test_return_weights(each_isa, rng):
    q, k, v = make_qkv(rng, 2, 4, 2, 100, 260, 16)
    out, w = sdpa(q, k, v, return_weights=True, window=(30, 30))
    assert w.shape == (2, 4, 100, 260)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out, sdpa(q, k, v, window=(30, 30)))
    assert_close_to_reference(out, q, k, v, weights=w, window=(30, 30))


@pytest.mark.parametrize("lq_small, hkv", [(1, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_path_gives_prefill_bits(each_isa, rng, lq_small, hkv, dtype):
    """The last queries computed alone (the decode path, Lq <= 4) give the
    same bits as inside a long prefill over the same keys: several queries,
    or one token with a GQA group of more than 4 query heads per KV head
    (one token with fewer sums its scores across D: test_core_kv's
    test_one_token_decode)."""
    b, hq, lk, d = 2, 8, 1500, 64
    q, k, v = make_qkv(rng, b, hq, hkv, 40, lk, d, dtype=dtype)
    kpm = rng.random((b, lk)) < 0.9
    fmask = rng.standard_normal((40, lk)).astype(dtype)
    for kw in (dict(is_causal=True), dict(window=700), dict(key_padding_mask=kpm, is_causal=True)):
        full = sdpa(q, k, v, **kw)
        tail = sdpa(q[:, :, -lq_small:], k, v, **kw)
        np.testing.assert_array_equal(tail, full[:, :, -lq_small:])
    # an additive mask: the small call gets the last rows of the big mask
    full = sdpa(q, k, v, attn_mask=fmask)
    tail = sdpa(q[:, :, -lq_small:], k, v, attn_mask=fmask[-lq_small:])
    np.testing.assert_array_equal(tail, full[:, :, -lq_small:])
