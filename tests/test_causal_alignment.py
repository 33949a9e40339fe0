"""Top-left causal alignment (PyTorch's and Keras' is_causal when Lq != Lk)
next to tileattn's default bottom-right one: forward, decode path, backward
and modules against the float64 reference, and against PyTorch itself."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from grad_reference import assert_grads_close
from reference import assert_close_to_reference, visible_keys

sdpa = tileattn.scaled_dot_product_attention
SHAPES = [(5, 7), (7, 5), (1, 9), (3, 200), (130, 97), (97, 300), (300, 97)]


@pytest.mark.parametrize("lq,lk", SHAPES)
@pytest.mark.parametrize("opts", [dict(is_causal=True), dict(window=(3, 2)),
                                  dict(window=4, is_causal=True)])
def test_top_left_matches_the_reference(each_isa, rng, lq, lk, opts):
    q, k, v = make_qkv(rng, 2, 4, 2, lq, lk, 32)
    out, w = sdpa(q, k, v, causal_alignment="top_left", return_weights=True, **opts)
    assert_close_to_reference(out, q, k, v, weights=w, causal_alignment="top_left", **opts)
    seen = visible_keys(lq, lk, causal_alignment="top_left", **opts)
    assert not w[..., ~seen].any()                  # hidden keys have weight exactly 0
    assert not out[:, :, ~seen.any(axis=1)].any()   # rows that see no key give zeros


def test_alignments_differ_only_when_lengths_do(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 64, 64, 16)
    a = sdpa(q, k, v, is_causal=True)
    b = sdpa(q, k, v, is_causal=True, causal_alignment="top_left")
    np.testing.assert_array_equal(a, b)
    q2 = q[:, :, :10]
    a = sdpa(q2, k, v, is_causal=True)
    b = sdpa(q2, k, v, is_causal=True, causal_alignment="top_left")
    assert np.abs(a - b).max() > 0.1


@pytest.mark.parametrize("lq,lk", [(1, 300), (4, 300), (130, 97)])
def test_top_left_with_key_padding_and_lengths(each_isa, rng, lq, lk):
    q, k, v = make_qkv(rng, 2, 4, 4, lq, lk, 16)
    kpm = rng.random((2, lk)) > 0.3
    kpm[:, 0] = True
    out = sdpa(q, k, v, is_causal=True, causal_alignment="top_left", key_padding_mask=kpm)
    assert_close_to_reference(out, q, k, v, is_causal=True, causal_alignment="top_left",
                              key_padding_mask=kpm)
    # Key lengths: top-left bounds do not move with an item's length.
    n = np.array([lk, lk // 2], np.int64)
    got = sdpa(q, k, v, is_causal=True, causal_alignment="top_left", key_lengths=n)
    for b in range(2):
        alone = sdpa(q[b:b + 1], k[b:b + 1, :, :n[b]], v[b:b + 1, :, :n[b]], is_causal=True,
                     causal_alignment="top_left")
        np.testing.assert_array_equal(got[b:b + 1], alone)


@pytest.mark.parametrize("lq,lk", [(5, 7), (7, 5), (130, 97), (97, 300)])
def test_top_left_backward_matches_the_reference(each_isa, rng, lq, lk):
    q, k, v = make_qkv(rng, 2, 4, 2, lq, lk, 16)
    kw = dict(is_causal=True, causal_alignment="top_left")
    out, lse = sdpa(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = tileattn.scaled_dot_product_attention_backward(dout, q, k, v, out, lse, **kw)
    assert_grads_close(grads, dout, q, k, v, **kw)


def test_matches_pytorch_is_causal(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    for lq, lk in SHAPES:
        q, k, v = make_qkv(rng, 2, 4, 4, lq, lk, 32)
        got = sdpa(q, k, v, is_causal=True, causal_alignment="top_left")
        want = F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                              is_causal=True).numpy()
        seen = visible_keys(lq, lk, is_causal=True, causal_alignment="top_left").any(axis=1)
        np.testing.assert_allclose(got[:, :, seen], want[:, :, seen], rtol=1e-5, atol=2e-6)
        assert not got[:, :, ~seen].any()   # PyTorch gives NaN there; tileattn zeros


def test_module_top_left_equals_its_materialised_mask(rng):
    mha = tileattn.MultiHeadAttention(32, 4, seed=0)
    xq = rng.standard_normal((2, 5, 32)).astype(np.float32)
    xkv = rng.standard_normal((2, 7, 32)).astype(np.float32)
    got = mha(xq, xkv, is_causal=True, causal_alignment="top_left")
    mask = visible_keys(5, 7, is_causal=True, causal_alignment="top_left")
    want = mha(xq, xkv, attn_mask=mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(got - mha(xq, xkv, is_causal=True)).max() > 1e-3


def test_bad_alignment_and_cache_refusal(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 4, 6, 8)
    with pytest.raises(tileattn.InvalidParameterError, match="causal_alignment"):
        sdpa(q, k, v, is_causal=True, causal_alignment="top-left")
    with pytest.raises(tileattn.InvalidParameterError, match="causal_alignment"):
        sdpa(q, k, v, causal_alignment=None)
    mha = tileattn.MultiHeadAttention(16, 2, seed=0)
    cache = tileattn.KVCache(1, 2, 16, 8)
    with pytest.raises(tileattn.InvalidParameterError, match="causal_alignment"):
        mha(np.zeros((1, 3, 16), np.float32), cache=cache, is_causal=True,
            causal_alignment="top_left")
    assert cache.lengths.tolist() == [0]    # refused before anything was appended
