"""varlen_attention: sequences packed end to end, each attended as if alone.
Against the same call on each sequence alone (bitwise, on every ISA path and
thread count) and against the float64 reference; errors name the argument
and leave `out` untouched."""

import numpy as np
import pytest

import tileattn
from tileattn import DTypeError, InvalidParameterError, ShapeError
from reference import assert_close_to_reference

LENGTHS = [5, 0, 17, 1, 130, 3, 96, 97]


def packed(rng, lengths, hq=4, hkv=4, d=16, dv=None, dtype=np.float32, k_lengths=None):
    """q (Tq, hq, d), k, v (Tk, hkv, d/dv) and the offsets."""
    k_lengths = lengths if k_lengths is None else k_lengths
    cu_q = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(k_lengths)]).astype(np.int64)
    q = rng.standard_normal((cu_q[-1], hq, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], hkv, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], hkv, dv or d)).astype(dtype)
    return q, k, v, cu_q, cu_k


def alone(q, k, v, **kw):
    """scaled_dot_product_attention of one sequence, in the packed layout."""
    t = (lambda a: a.transpose(1, 0, 2))
    return t(tileattn.scaled_dot_product_attention(t(q), t(k), t(v), **kw))


def each(cu):
    return [slice(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


OPTIONS = [dict(), dict(is_causal=True), dict(window=4), dict(window=(3, 2)),
           dict(is_causal=True, causal_alignment="top_left"), dict(scale=0.3)]


@pytest.mark.parametrize("kw", OPTIONS)
def test_each_sequence_has_the_bits_of_a_call_alone(rng, each_isa, kw):
    q, k, v, cu, _ = packed(rng, LENGTHS)
    got = tileattn.varlen_attention(q, k, v, cu, **kw)
    assert got.shape == (cu[-1], 4, 16) and got.dtype == np.float32
    for s in each(cu):
        if s.stop > s.start:
            np.testing.assert_array_equal(got[s], alone(q[s], k[s], v[s], **kw))


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(window=7)])
def test_cross_attention_gqa_and_other_key_lengths(rng, kw):
    lq, lk = [3, 40, 1, 0, 9], [10, 40, 0, 5, 200]
    q, k, v, cu_q, cu_k = packed(rng, lq, hq=6, hkv=2, d=8, dv=12, k_lengths=lk)
    got = tileattn.varlen_attention(q, k, v, cu_q, cu_k, **kw)
    assert got.shape == (sum(lq), 6, 12)
    for sq, sk, n in zip(each(cu_q), each(cu_k), lk):
        if sq.stop == sq.start:
            continue
        if n == 0:                                        # no keys: zeros
            assert not got[sq].any()
            continue
        np.testing.assert_array_equal(got[sq], alone(q[sq], k[sk], v[sk], **kw))
        t = (lambda a: a.transpose(1, 0, 2)[None])
        assert_close_to_reference(t(got[sq]), t(q[sq]), t(k[sk]), t(v[sk]), **kw)


def test_against_the_float64_reference_and_in_float64(rng):
    q, k, v, cu, _ = packed(rng, LENGTHS, dtype=np.float64)
    got = tileattn.varlen_attention(q, k, v, cu, is_causal=True)
    assert got.dtype == np.float64
    t = (lambda a: a.transpose(1, 0, 2)[None])
    for s in each(cu):
        if s.stop > s.start:
            assert_close_to_reference(t(got[s]), t(q[s]), t(k[s]), t(v[s]), is_causal=True)


def test_float16_in_float16_out(rng):
    q, k, v, cu, _ = packed(rng, [7, 30], dtype=np.float16)
    got = tileattn.varlen_attention(q, k, v, cu)
    assert got.dtype == np.float16
    want = tileattn.varlen_attention(q.astype(np.float32), k.astype(np.float32),
                                     v.astype(np.float32), cu)
    np.testing.assert_array_equal(got, want.astype(np.float16))


def test_views_of_a_fused_projection_and_out(rng):
    """q, k, v as column blocks of one (T, 3, H, D) array, read in place,
    and a caller's out."""
    lengths = [12, 50, 3]
    cu = np.cumsum([0] + lengths)
    qkv = rng.standard_normal((cu[-1], 3, 4, 16)).astype(np.float32)
    out = np.full((cu[-1], 4, 16), np.nan, np.float32)
    r = tileattn.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, out=out)
    assert r is out
    want = tileattn.varlen_attention(*(np.ascontiguousarray(qkv[:, i]) for i in range(3)), cu)
    np.testing.assert_array_equal(out, want)


def test_the_same_bits_at_any_thread_count(rng, restore_threads):
    q, k, v, cu, _ = packed(rng, [300, 7, 150, 1], hq=8, hkv=2, d=32)
    results = []
    for n in (1, 2, 3):
        tileattn.set_num_threads(n)
        results.append(tileattn.varlen_attention(q, k, v, cu, is_causal=True))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_no_sequences_and_empty_rows(rng):
    q = np.zeros((0, 2, 8), np.float32)
    assert tileattn.varlen_attention(q, q, q, [0]).shape == (0, 2, 8)
    assert tileattn.varlen_attention(q, q, q, [0, 0, 0]).shape == (0, 2, 8)


@pytest.mark.parametrize("change, error, message", [
    (dict(cu_seqlens_q=[1, 5, 10]), InvalidParameterError, r"cu_seqlens_q: expected offsets from 0 to 10"),
    (dict(cu_seqlens_q=[0, 5, 9]), InvalidParameterError, r"from 0 to 10 \(the rows of q\), got 0 to 9"),
    (dict(cu_seqlens_q=[0, 6, 4, 10]), InvalidParameterError, "must not decrease; entry 2 is 4 after 6"),
    (dict(cu_seqlens_q=[0.0, 10.0]), DTypeError, "cu_seqlens_q: expected integers"),
    (dict(cu_seqlens_q=[[0, 10]]), ShapeError, "cu_seqlens_q: expected a 1-D array"),
    (dict(cu_seqlens_k=[0, 10]), ShapeError, "cu_seqlens_k: expected 3 offsets"),
    (dict(k="4d"), ShapeError, r"k: expected packed rows \(Tk, Hkv, D\)"),
    (dict(k="heads3"), ShapeError, "whole multiple"),
    (dict(v="int"), DTypeError, "v: expected float16, bfloat16, float32 or float64"),
    (dict(window=0), InvalidParameterError, "window"),
])
def test_errors_name_the_argument_and_write_nothing(rng, change, error, message):
    q, k, v, cu, _ = packed(rng, [4, 6])
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu)
    extra = {}
    for name, value in change.items():
        if value == "4d":
            value = k[None]
        elif value == "heads3":
            value = np.zeros((10, 3, 16), np.float32)
            args["v"] = value
        elif value == "int":
            value = np.zeros(v.shape, np.int32)
        (args if name in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k") else extra)[name] = value
    out = np.full((10, 4, 16), 7.0, np.float32)
    with pytest.raises(error, match=message):
        tileattn.varlen_attention(**args, **extra, out=out)
    assert (out == 7.0).all()
