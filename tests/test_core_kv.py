"""Kernel support for the KV cache: half-precision K/V storage and per-item
key lengths (ragged batches), through the private _core entry point."""

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from reference import assert_close_to_reference

core = tileattn._core
sdpa = tileattn.scaled_dot_product_attention


def core_attention(q, k, v, *, causal=False, window=None, key_lengths=None, kpm=None):
    left, right = -1, -1
    if window is not None:
        left, right = window
    if causal:
        right = 0 if right == -1 else min(right, 0)
    out = np.empty(q.shape[:3] + (v.shape[3],), np.float32)
    core.attention_forward(q, k, v, out, core.AttentionOptions(
        scale=1.0 / np.sqrt(q.shape[-1]), window_left=left, window_right=right,
        key_padding=kpm, key_lengths=key_lengths))
    return out


@pytest.mark.parametrize("lq", [1, 3, 130])  # decode path and blocked path
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(300, 0))])
def test_half_kv_equals_float32_on_the_widened_values(each_isa, rng, lq, kw):
    q, k, v = make_qkv(rng, 2, 8, 2, lq, 900, 64)
    k16, v16 = k.astype(np.float16), v.astype(np.float16)
    got = core_attention(q, k16, v16, **kw)
    want = core_attention(q, k16.astype(np.float32), v16.astype(np.float32), **kw)
    np.testing.assert_array_equal(got, want)  # widening is exact; the rest is the same
    ref_kw = dict(is_causal=kw.get("causal", False), window=kw.get("window"))
    assert_close_to_reference(got, q, k16.astype(np.float32), v16.astype(np.float32), **ref_kw)


def test_half_kv_strided_and_odd_value_dim(rng):
    q = rng.standard_normal((1, 4, 2, 24)).astype(np.float32)
    big = rng.standard_normal((1, 4, 300, 2 * 24)).astype(np.float16)
    k = big[..., ::2]
    v = big[..., :20]
    got = core_attention(q, k, v, causal=True)
    want = core_attention(q, k.astype(np.float32), v.astype(np.float32), causal=True)
    np.testing.assert_array_equal(got, want)


def test_half_kv_special_values(rng):
    """Subnormal, zero and large half values widen exactly."""
    q = rng.standard_normal((1, 1, 5, 8)).astype(np.float32)
    vals = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504.0, -65504.0, 1.0], np.float16)
    k = np.tile(vals, (1, 1, 40, 1)).astype(np.float16) * np.float16(0.001)
    v = np.tile(vals, (1, 1, 40, 1)).astype(np.float16)
    got = core_attention(q, k, v)
    want = core_attention(q, k.astype(np.float32), v.astype(np.float32))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("lq", [1, 4, 100])
def test_key_lengths_equal_each_sequence_alone(each_isa, rng, lq):
    """Ragged batch: item b sees only its first key_lengths[b] keys, with the
    causal diagonal aligned to its own length; each equals the item alone."""
    b, lk = 4, 700
    q, k, v = make_qkv(rng, b, 6, 3, lq, lk, 32)
    lengths = np.array([700, 257, lq, 0 if lq == 1 else lq + 1], dtype=np.int64)
    for kw in (dict(), dict(causal=True), dict(window=(100, 0))):
        got = core_attention(q, k, v, key_lengths=lengths, **kw)
        for i, n in enumerate(lengths):
            alone = core_attention(q[i : i + 1], np.ascontiguousarray(k[i : i + 1, :, :n]),
                                   np.ascontiguousarray(v[i : i + 1, :, :n]), **kw)
            np.testing.assert_array_equal(got[i : i + 1], alone)


def test_key_lengths_match_prefix_padding_mask(rng):
    q, k, v = make_qkv(rng, 3, 4, 4, 50, 400, 16)
    lengths = np.array([400, 123, 7], dtype=np.int64)
    kpm = np.arange(400)[None, :] < lengths[:, None]
    got = core_attention(q, k, v, key_lengths=lengths)
    np.testing.assert_array_equal(got, sdpa(q, k, v, key_padding_mask=kpm))


def test_key_lengths_errors(rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 5, 10, 8)
    with pytest.raises(ValueError, match="key_lengths: entry 1 is 11"):
        core_attention(q, k, v, key_lengths=np.array([3, 11], np.int64))
    with pytest.raises(ValueError, match="key_lengths: expected shape"):
        core_attention(q, k, v, key_lengths=np.array([3], np.int64))
    with pytest.raises(ValueError, match="key_lengths: expected dtype"):
        core_attention(q, k, v, key_lengths=np.array([3, 4], np.int32))


@pytest.mark.parametrize("d", [40, 64, 128])
@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("hq", [3, 6, 12])
def test_one_token_decode(each_isa, rng, d, half, hq):
    """Decoding one token with 1, 2 or 4 query heads per KV head (the decode
    path sums each score across the head dimension in SIMD lanes, which
    rounds differently from the prefill's chains) is within round-off of
    the float64 reference, for whole and partial key tiles, on float32 and
    half K/V; an item's bits do not depend on the rest of the batch."""
    q, k, v = make_qkv(rng, 2, hq, 3, 30, 1007, d)
    if half:
        k, v = k.astype(np.float16), v.astype(np.float16)
    kf, vf = k.astype(np.float32), v.astype(np.float32)
    for kw, ref_kw in ((dict(causal=True), dict(is_causal=True)),
                       (dict(window=(333, 0)), dict(window=(333, 0)))):
        tail = core_attention(q[:, :, -1:], k, v, **kw)
        assert_close_to_reference(tail, q[:, :, -1:], kf, vf, **ref_kw)
        np.testing.assert_allclose(tail, core_attention(q, k, v, **kw)[:, :, -1:],
                                   rtol=0, atol=1e-6)
        alone = core_attention(q[1:, :, -1:], k[1:], v[1:], **kw)
        np.testing.assert_array_equal(alone, tail[1:])
