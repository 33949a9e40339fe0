"""KVCache and MultiHeadAttention(cache=): incremental decoding against
independent references (the float64 oracle of reference.py and a dense
NumPy decoder written here from the module's definition)."""

import pickle
import tracemalloc

import numpy as np
import pytest

import tileattn
from tileattn import DTypeError, InvalidParameterError, KVCache, ShapeError
from reference import _check, assert_close_to_reference, attention


# -- a dense NumPy decoder: the module's math, written out --------------------
def rope_np(x, positions, theta=10000.0):
    """x (B, L, H, D) rotated at positions (L,) ("rotate half" pairing)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(d // 2, dtype=np.float64) * 2.0 / d)
    ang = np.asarray(positions, np.float64)[:, None] * inv
    cos, sin = (f(ang).astype(x.dtype)[None, :, None, :] for f in (np.cos, np.sin))
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dense_decoder(m, x, *, dtype, window=None, kv_dtype=None, stored=None):
    """One causal pass of MultiHeadAttention m over x (B, L, E), computed
    densely in `dtype`; K/V rounded to `kv_dtype` as a cache stores them:
    from ``stored`` ((B, L, Hkv, D) keys after RoPE and values, float32, as
    the module computes them) when given."""
    sd = {k: v.astype(dtype) for k, v in m.state_dict().items()}
    b, l, _ = x.shape
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim
    x = x.astype(dtype)
    q = (x @ sd["q_proj.weight"].T + sd["q_proj.bias"]).reshape(b, l, hq, d)
    k = (x @ sd["k_proj.weight"].T + sd["k_proj.bias"]).reshape(b, l, hkv, d)
    v = (x @ sd["v_proj.weight"].T + sd["v_proj.bias"]).reshape(b, l, hkv, m.value_dim)
    if m.rope:
        q, k = rope_np(q, np.arange(l)), rope_np(k, np.arange(l))
    if stored is not None:
        k, v = stored
    if kv_dtype is not None:
        k, v = (a.astype(kv_dtype).astype(dtype) for a in (k, v))
    t = lambda a: a.transpose(0, 2, 1, 3)  # noqa: E731
    o, _ = attention(t(q), t(k), t(v), is_causal=True, window=window, dtype=dtype)
    o = t(o).reshape(b, l, hq * m.value_dim)
    return o @ sd["out_proj.weight"].T + sd["out_proj.bias"]


def module_kv(m, x):
    """The float32 keys (after RoPE) and values m computes for x (B, L, E),
    as (B, L, Hkv, D) arrays, read from a float32 cache."""
    b, l, _ = x.shape
    c = KVCache(b, m.num_kv_heads, l, m.head_dim, value_dim=m.value_dim)
    m(x, is_causal=True, cache=c)
    k, v = zip(*(c.contents(i) for i in range(b)))
    return tuple(np.stack(a).transpose(0, 2, 1, 3) for a in (k, v))


def check_decoder(got, m, x, *, window=None, kv_dtype=None):
    """got is as accurate as a float32 NumPy pass storing K/V in kv_dtype.
    A narrower kv_dtype rounds the float32 K/V the module computed (which
    the float32 cases check against the float64 projections): one float32
    ulp of difference would otherwise flip elements near a float16 rounding
    boundary by a whole float16 ulp, in ours or NumPy's arbitrarily."""
    stored = None if kv_dtype is None else module_kv(m, x)
    oracle = dense_decoder(m, x, dtype=np.float64, window=window, kv_dtype=kv_dtype,
                           stored=stored)
    plain = dense_decoder(m, x, dtype=np.float32, window=window, kv_dtype=kv_dtype,
                          stored=stored)
    _check("decoded", got, oracle, plain, float(np.max(np.abs(oracle))))


def module(e=64, h=8, hkv=2, seed=3, **kw):
    m = tileattn.MultiHeadAttention(e, h, num_kv_heads=hkv, rope=True, seed=seed, **kw)
    rng = np.random.default_rng(seed)
    sd = m.state_dict()
    for name in ("q_proj.bias", "k_proj.bias", "v_proj.bias", "out_proj.bias"):
        sd[name] = rng.standard_normal(sd[name].shape) * 0.1
    m.load_state_dict(sd)
    return m


def decode(m, x, cache, chunks, **kw):
    outs, s = [], 0
    for n in chunks:
        outs.append(m(x[:, s:s + n], is_causal=True, cache=cache, **kw))
        s += n
    assert s == x.shape[1]
    return np.concatenate(outs, axis=1)


def tokens(rng, b, l, e=64):
    return rng.standard_normal((b, l, e)).astype(np.float32)


CHUNKINGS = {"steps": lambda l: [1] * l, "prefill+steps": lambda l: [13] + [1] * (l - 20) + [7],
             "chunks": lambda l: [5, 1, 3, 17, 2, l - 28]}


# -- equivalence with one causal pass -----------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("hkv", [8, 2, 1])           # MHA, GQA, MQA
@pytest.mark.parametrize("how", list(CHUNKINGS))
def test_decoding_reproduces_one_causal_pass(rng, dtype, hkv, how):
    m = module(hkv=hkv)
    x = tokens(rng, 2, 40)
    cache = KVCache(2, hkv, 64, m.head_dim, dtype=dtype)
    got = decode(m, x, cache, CHUNKINGS[how](40))
    check_decoder(got, m, x, kv_dtype=None if dtype == np.float32 else np.float16)
    if dtype == np.float32:
        full = m(x, is_causal=True)
        np.testing.assert_allclose(got, full, rtol=0, atol=8 * 2.0**-24 * 40 * np.abs(full).max())
    assert cache.lengths.tolist() == [40, 40]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("how", list(CHUNKINGS))
@pytest.mark.parametrize("w", [1, 6, 16])
def test_window_ring_reproduces_windowed_pass(rng, dtype, how, w):
    m = module(hkv=2)
    x = tokens(rng, 2, 40)
    cache = KVCache(2, 2, 1000, m.head_dim, dtype=dtype, window=w)
    assert cache.ring and cache.k.shape[2] == w         # fixed memory: w rows
    got = decode(m, x, cache, CHUNKINGS[how](40))
    check_decoder(got, m, x, window=w, kv_dtype=None if dtype == np.float32 else np.float16)
    k, _ = cache.contents(1)
    assert k.shape == (2, w, m.head_dim)


def test_ring_narrower_attention_window_and_too_wide(rng):
    m = module(hkv=2)
    x = tokens(rng, 1, 30)
    cache = KVCache(1, 2, 100, m.head_dim, window=8)
    got = decode(m, x, cache, [4, 1, 1, 9, 1] + [1] * 14, window=5)
    check_decoder(got, m, x, window=5)
    with pytest.raises(InvalidParameterError, match="window"):
        m(x[:, :1], is_causal=True, cache=cache, window=9)


def test_linear_cache_with_window_option(rng):
    m = module(hkv=4)
    x = tokens(rng, 2, 35)
    cache = KVCache(2, 4, 35, m.head_dim)
    check_decoder(decode(m, x, cache, [10] + [1] * 25, window=7), m, x, window=7)


def test_chunk_longer_than_ring(rng):
    m = module(hkv=2)
    x = tokens(rng, 1, 50)
    cache = KVCache(1, 2, 50, m.head_dim, window=6)
    check_decoder(decode(m, x, cache, [23, 1, 26]), m, x, window=6)


# -- ragged batches -----------------------------------------------------------
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_mixed_lengths_in_one_batch(rng, window, dtype):
    """Prompts of lengths 9, 4, 1, 0 right-padded in one prefill, then steps
    in which some sequences pause: each sequence is decoded as if alone."""
    m = module(hkv=2)
    lens = [9, 4, 1, 0]
    total = [20, 12, 15, 6]
    xs = [tokens(rng, 1, n) for n in total]
    cache = KVCache(4, 2, 32, m.head_dim, dtype=dtype, window=window)
    prompt = np.zeros((4, 9, 64), np.float32)
    for i, n in enumerate(lens):
        prompt[i, :n] = xs[i][0, :n]
    kpm = np.arange(9)[None, :] < np.array(lens)[:, None]
    y = m(prompt, is_causal=True, cache=cache, key_padding_mask=kpm)
    outs = [[y[i, :n]] for i, n in enumerate(lens)]
    pos = list(lens)
    while any(p < t for p, t in zip(pos, total)):
        step = np.zeros((4, 1, 64), np.float32)
        live = np.array([p < t for p, t in zip(pos, total)])
        for i in np.flatnonzero(live):
            step[i, 0] = xs[i][0, pos[i]]
        y = m(step, is_causal=True, cache=cache, key_padding_mask=live[:, None])
        for i in np.flatnonzero(live):
            outs[i].append(y[i])
            pos[i] += 1
    assert cache.lengths.tolist() == total
    for i in range(4):
        got = np.concatenate(outs[i])[None]
        check_decoder(got, m, xs[i], window=window,
                      kv_dtype=None if dtype == np.float32 else np.float16)


def test_padding_mask_must_be_prefix_form(rng):
    m = module()
    cache = KVCache(2, 2, 16, m.head_dim)
    x = tokens(rng, 2, 3)
    with pytest.raises(InvalidParameterError, match="key_padding_mask.*row 1"):
        m(x, is_causal=True, cache=cache, key_padding_mask=[[1, 1, 0], [1, 0, 1]])
    with pytest.raises(ShapeError, match="key_padding_mask"):
        m(x, is_causal=True, cache=cache, key_padding_mask=np.ones((2, 4), bool))
    assert cache.lengths.tolist() == [0, 0]


# -- the cache on its own -----------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("window", [None, 7])
def test_attend_matches_oracle(each_isa, rng, dtype, window):
    b, hq, hkv, l, d = 2, 6, 3, 60, 32
    q = rng.standard_normal((b, hq, l, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, l, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, l, 24)).astype(np.float32)
    cache = KVCache(b, hkv, l, d, value_dim=24, dtype=dtype, window=window)
    outs, s = [], 0
    for n in [1, 1, 20, 1, 4, 33]:
        outs.append(cache.attend(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n]))
        s += n
    kr, vr = (a.astype(dtype).astype(np.float32) for a in (k, v))
    assert_close_to_reference(np.concatenate(outs, 2), q, kr, vr, is_causal=True, window=window)


def test_float64_cache(rng):
    m = tileattn.MultiHeadAttention(32, 4, rope=True, dtype=np.float64, seed=0)
    x = rng.standard_normal((1, 12, 32))
    cache = KVCache(1, 4, 12, 8, dtype=np.float64)
    got = decode(m, x, cache, [3] + [1] * 9)
    np.testing.assert_allclose(got, m(x, is_causal=True), rtol=0, atol=1e-12)


def test_unbatched_query(rng):
    m = module(hkv=2)
    x = tokens(rng, 1, 10)
    cache = KVCache(1, 2, 10, m.head_dim)
    a = m(x[0, :6], is_causal=True, cache=cache)
    b = m(x[0, 6:], is_causal=True, cache=cache)
    assert a.shape == (6, 64) and b.shape == (4, 64)
    check_decoder(np.concatenate([a, b])[None], m, x)


def test_append_and_contents(rng):
    cache = KVCache(2, 3, 10, 4, value_dim=2, dtype=np.float16)
    k = rng.standard_normal((2, 3, 5, 4))
    v = rng.standard_normal((2, 3, 5, 2))
    assert cache.append(k, v, counts=[5, 2]).tolist() == [0, 0]
    assert cache.append(k[:, :, :1], v[:, :, :1]).tolist() == [5, 2]
    ck, cv = cache.contents(1)
    np.testing.assert_array_equal(ck, np.concatenate([k[1, :, :2], k[1, :, :1]], 1).astype(np.float16))
    assert cv.shape == (3, 3, 2) and cache.k.dtype == np.float16
    with pytest.raises(ValueError):
        cache.lengths[0] = 3          # a read-only copy


def test_ring_contents_in_position_order(rng):
    cache = KVCache(1, 1, 100, 2, window=4)
    k = np.arange(20, dtype=np.float32).reshape(1, 1, 10, 2)
    cache.append(k[:, :, :3], k[:, :, :3])
    cache.append(k[:, :, 3:9], k[:, :, 3:9])
    ck, _ = cache.contents(0)
    np.testing.assert_array_equal(ck[0], k[0, 0, 5:9])


# -- rollback, reset, overflow --------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rollback_then_continue_equals_fresh_decode(rng, dtype):
    m = module(hkv=2)
    x = tokens(rng, 2, 16)
    other = tokens(rng, 2, 4)
    cache = KVCache(2, 2, 32, m.head_dim, dtype=dtype)
    decode(m, x[:, :12], cache, [8, 1, 1, 1, 1])
    cache.trim(4)                                   # drop positions 8..11
    decode(m, other, cache, [2, 1, 1])              # a different continuation
    cache.trim([4, 0])                              # per sequence
    assert cache.lengths.tolist() == [8, 12]
    cache.trim([0, 4])
    got = decode(m, x[:, 8:], cache, [1] * 8)
    fresh = KVCache(2, 2, 32, m.head_dim, dtype=dtype)
    want = decode(m, x, fresh, [8] + [1] * 8)[:, 8:]
    np.testing.assert_array_equal(got, want)


def test_ring_rollback_only_before_wrapping(rng):
    m = module(hkv=2)
    x = tokens(rng, 1, 12)
    cache = KVCache(1, 2, 100, m.head_dim, window=8)
    decode(m, x[:, :6], cache, [6])
    cache.trim(2)                                   # nothing overwritten yet
    decode(m, x[:, 4:], cache, [1] * 8)
    with pytest.raises(InvalidParameterError, match="ring.*window=8"):
        cache.trim(1)
    assert cache.lengths.tolist() == [12]


def test_reset_starts_over(rng):
    m = module()
    x = tokens(rng, 2, 6)
    cache = KVCache(2, 2, 6, m.head_dim)
    first = decode(m, x, cache, [6])
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    np.testing.assert_array_equal(decode(m, x, cache, [6]), first)


def test_overflow_raises_and_writes_nothing(rng):
    m = module()
    cache = KVCache(2, 2, 5, m.head_dim)
    m(tokens(rng, 2, 4), is_causal=True, cache=cache)
    before = cache.k.copy()
    with pytest.raises(InvalidParameterError, match="sequence 0.*max_len=5"):
        m(tokens(rng, 2, 2), is_causal=True, cache=cache)
    assert cache.lengths.tolist() == [4, 4]
    np.testing.assert_array_equal(cache.k, before)
    m(tokens(rng, 2, 2), is_causal=True, cache=cache, key_padding_mask=[[0, 0], [1, 0]])
    assert cache.lengths.tolist() == [4, 5]
    with pytest.raises(InvalidParameterError, match="max_len.*sequence 1"):
        cache.append(np.zeros((2, 2, 1, 8)), np.zeros((2, 2, 1, 8)))
    ring = KVCache(1, 1, 3, 2, window=2)
    ring.append(np.zeros((1, 1, 3, 2)), np.zeros((1, 1, 3, 2)))
    with pytest.raises(InvalidParameterError, match="max_len=3"):
        ring.append(np.zeros((1, 1, 1, 2)), np.zeros((1, 1, 1, 2)))


def test_trim_errors():
    cache = KVCache(2, 1, 8, 2)
    cache.append(np.zeros((2, 1, 3, 2)), np.zeros((2, 1, 3, 2)), counts=[3, 1])
    with pytest.raises(InvalidParameterError, match="n: entry 1 is 2"):
        cache.trim(2)
    with pytest.raises(InvalidParameterError, match="n: entry 0 is -1"):
        cache.trim([-1, 0])
    with pytest.raises(ShapeError, match="n: expected an int or shape"):
        cache.trim([1, 1, 1])
    with pytest.raises(DTypeError, match="n:"):
        cache.trim(1.5)
    assert cache.lengths.tolist() == [3, 1]


# -- construction and call errors ----------------------------------------------
@pytest.mark.parametrize("kw, err, match", [
    (dict(batch=0), InvalidParameterError, "batch"),
    (dict(max_len=2.5), InvalidParameterError, "max_len"),
    (dict(head_dim=True), InvalidParameterError, "head_dim"),
    (dict(value_dim=-1), InvalidParameterError, "value_dim"),
    (dict(window=0), InvalidParameterError, "window"),
    (dict(dtype=np.int32), DTypeError, "dtype"),
    (dict(dtype="bogus"), DTypeError, "dtype"),
])
def test_constructor_errors(kw, err, match):
    args = dict(batch=1, num_kv_heads=2, max_len=8, head_dim=4)
    args.update(kw)
    with pytest.raises(err, match=match):
        KVCache(**args)


def test_call_errors(rng):
    m = module()                                    # hkv 2, head_dim 8
    x = tokens(rng, 2, 3)
    with pytest.raises(ShapeError, match="cache.*num_kv_heads"):
        m(x, is_causal=True, cache=KVCache(2, 4, 8, 8))
    with pytest.raises(ShapeError, match="query: batch 2.*cache's batch 3"):
        m(x, is_causal=True, cache=KVCache(3, 2, 8, 8))
    with pytest.raises(DTypeError, match="cache: a float32 module"):
        m(x, is_causal=True, cache=KVCache(2, 2, 8, 8, dtype=np.float64))
    m64 = tileattn.MultiHeadAttention(64, 8, num_kv_heads=2, dtype=np.float64)
    with pytest.raises(DTypeError, match="cache: a float64 module"):
        m64(x, is_causal=True, cache=KVCache(2, 2, 8, 8, dtype=np.float16))
    cross = tileattn.MultiHeadAttention(64, 8, num_kv_heads=2, kdim=32, vdim=32)
    with pytest.raises(InvalidParameterError, match="cache: incremental self-attention needs"):
        cross(x, is_causal=True, cache=KVCache(2, 2, 8, 8))
    cache = KVCache(2, 2, 8, 8)
    for kw, name in ((dict(attn_mask=np.ones((3, 3), bool)), "attn_mask"),
                     (dict(need_weights=True), "need_weights")):
        with pytest.raises(InvalidParameterError, match=name):
            m(x, is_causal=True, cache=cache, **kw)
    with pytest.raises(InvalidParameterError, match="key"):
        m(x, x + 1, is_causal=True, cache=cache)
    with pytest.raises(InvalidParameterError, match="cache: expected a tileattn.KVCache"):
        m(x, cache="cache")
    with pytest.raises(ShapeError, match="k: expected \\(B, Hkv, T, head_dim\\)"):
        cache.append(np.zeros((2, 2, 1, 4)), np.zeros((2, 2, 1, 8)))
    with pytest.raises(DTypeError, match="v: expected float"):
        cache.append(np.zeros((2, 2, 1, 8)), np.zeros((2, 2, 1, 8), int))
    with pytest.raises(DTypeError, match="q: expected float32"):
        cache.attend(np.zeros((2, 4, 1, 8)), np.zeros((2, 2, 1, 8)), np.zeros((2, 2, 1, 8)))
    with pytest.raises(ShapeError, match="q: expected"):
        cache.attend(np.zeros((2, 3, 1, 8), np.float32), np.zeros((2, 2, 1, 8)),
                     np.zeros((2, 2, 1, 8)))
    assert cache.lengths.tolist() == [0, 0]


def test_concurrent_use_of_one_cache_is_refused(rng):
    """Two threads on one cache would interleave two streams' positions: the
    second call is refused while the first holds the cache."""
    cache = KVCache(1, 2, 8, 4)
    kv = np.zeros((1, 2, 1, 4), np.float32)
    q = np.zeros((1, 2, 1, 4), np.float32)
    with cache._in_use():                     # as if another thread were inside attend
        for call in (lambda: cache.attend(q, kv, kv), lambda: cache.append(kv, kv),
                     lambda: cache.trim(0), cache.reset):
            with pytest.raises(InvalidParameterError, match="cache: already in use"):
                call()
    assert cache.lengths.tolist() == [0]
    cache.attend(q, kv, kv)
    assert cache.lengths.tolist() == [1]


# -- memory and pickling ----------------------------------------------------------
def test_half_cache_step_makes_no_float32_copy(rng):
    """A float16 decoding step allocates far less than the cache itself: the
    kernel reads the half values in place."""
    b, hq, hkv, l, d = 1, 8, 8, 4096, 64
    cache = KVCache(b, hkv, l, d, dtype=np.float16)
    kv = rng.standard_normal((b, hkv, l - 1, d)).astype(np.float16)
    cache.append(kv, kv)
    q = rng.standard_normal((b, hq, 1, d)).astype(np.float32)
    new = rng.standard_normal((b, hkv, 1, d)).astype(np.float32)
    tracemalloc.start()
    try:
        out = cache.attend(q, new, new)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (b, hq, 1, d)
    assert peak < cache.nbytes / 50, (peak, cache.nbytes)


def test_cache_pickles_only_filled_rows(rng):
    m = module()
    x = tokens(rng, 2, 10)
    cache = KVCache(2, 2, 4096, m.head_dim, dtype=np.float16)
    decode(m, x[:, :6], cache, [6])
    blob = pickle.dumps(cache)
    assert len(blob) < cache.nbytes / 100
    clone = pickle.loads(blob)
    assert clone.k.shape == cache.k.shape and clone.lengths.tolist() == [6, 6]
    np.testing.assert_array_equal(decode(m, x[:, 6:], clone, [1] * 4),
                                  decode(m, x[:, 6:], cache, [1] * 4))
    ring = KVCache(1, 2, 10**9, 8, window=16)
    assert ring.nbytes == 2 * 2 * 16 * 8 * 4
    assert pickle.loads(pickle.dumps(ring)).lengths.tolist() == [0]
    assert "KVCache(batch=1" in repr(ring) and "window=16" in repr(ring)


# Pickles made before the cache's storage moved into layout objects (a ring
# after 5 and 2 appended positions, and a linear cache after 3).
_RING_PICKLE = (
    "eNp1kb1OwzAUha9TQltRECyoQjxAWTIwMbCFn7aWOjCwRo4TcNQkrVKnpQNSGBBU8tbLG/HTduOJIE4pDBV3sH3s6+"
    "9Yx9nGyyeBotSODEKfSRlbnHHhoyrTa7tYTfHoAe+xoUyXSS6QGqoWp5HTHTrCZ94AKVHliN05oR8jraqK3nW8INKd"
    "1SELU3+lTE+O+znbzO/3x7jSU1TGzTFOnp/wChu0pMgpdjqd9ldexUBBoqs2R0Hs9UaYN1Q46zMeyLEWpItqvyBaDu"
    "8lvhWloQxYkrDcouYkPu/FA5mkXOZOYkuVY295OEUKj2gTF5fGpEENSmiJGhLF7sSuwwVcQjNrwhmcQytrQTtr67RQ"
    "P4cMUdTFgUaIw/8A7/ABs2wGr/AG82wOi2zxC6joxG6lGKxzqJGLbWUEJ3+piL31TCb2rrn8QDB+Zo1OXesbGk2sDA"
    "==")
_LINEAR_PICKLE = (
    "eNptUU1LxDAQbdqtW3EVvcgi/oD10pMHD4JCbwZ68OC1pGk0ZftFN+26B2E9iC7MreO/8b9p0rIIrpNMyJth3gsv69"
    "HnF7H6gCOVZoIpVficcSkQxvQh6G8dXrziC87AjZniEimBSdHk0byNpGDJwhTGOXuOMlEgHYFnqlGS5kht2G9Z1ogB"
    "EXATtao0t6vnqxVucYdgP17i5uMd73FGHSDXGIbh3beO/qCWwhj2lmmRlEsMweOsYjxVK6NH5ginPaEf8bIWft5kKm"
    "V1zbTCJKoFL4uFqhuutJA8gHGRDM0OqfWGAYlx0CV66+VQW6E83gRTy1rf/JdoXkNalFN5Zijk+R8CMhBMtLG32+yH"
    "PGPSk5KL3VlKNDgEO736NUKe7NqwCTxn+DPLUDax/wPtRaN5")


def test_pickles_of_the_former_format_still_load():
    import base64
    import zlib
    # The two pickles were made under NumPy 2, whose arrays pickle as
    # numpy._core.multiarray._reconstruct: NumPy before 1.26 (no numpy._core)
    # loads no NumPy 2 pickle at all, whoever made it. That is NumPy's limit,
    # not the cache format's (seen on Debian bookworm's NumPy 1.24, the
    # aarch64 check of tools/aarch64_check.sh).
    pytest.importorskip("numpy._core", reason="NumPy < 1.26 cannot load NumPy 2 pickles")
    ring = pickle.loads(zlib.decompress(base64.b64decode(_RING_PICKLE)))
    assert ring.ring and ring.lengths.tolist() == [5, 2] and ring.k.shape == (2, 1, 3, 2)
    k0, v0 = ring.contents(0)
    np.testing.assert_array_equal(k0[0], [[4, 5], [6, 7], [8, 9]])
    np.testing.assert_array_equal(v0, -k0)
    np.testing.assert_array_equal(ring.contents(1)[0][0], [[10, 11], [12, 13]])
    ring.append(np.zeros((2, 1, 1, 2)), np.zeros((2, 1, 1, 2)))     # still usable
    assert ring.lengths.tolist() == [6, 3]
    linear = pickle.loads(zlib.decompress(base64.b64decode(_LINEAR_PICKLE)))
    assert not linear.ring and linear.lengths.tolist() == [3] and linear.v.shape == (1, 1, 4, 1)
    np.testing.assert_array_equal(linear.contents(0)[1], np.full((1, 3, 1), 2.0))


@pytest.mark.parametrize("window", [None, 3])
def test_refused_calls_leave_the_cache_unchanged(rng, window):
    """Every argument is checked before anything is written, in either layout."""
    cache = KVCache(2, 2, 6, 4, window=window)
    cache.append(rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 4)))
    before = (cache.k.copy(), cache.v.copy(), cache.lengths)

    def z(t, d=4):
        return np.ones((2, 2, t, d), np.float32)

    refused = [
        lambda: cache.append(z(2), z(2)),                          # past max_len
        lambda: cache.append(z(1), z(1), counts=[2, 0]),
        lambda: cache.append(z(1, 3), z(1)),
        lambda: cache.attend(z(1), z(1), z(1), counts=[1, 2]),
        lambda: cache.attend(z(2), z(2), z(2)),                    # past max_len
        lambda: cache.attend(z(1), z(1), z(1), window=(7, 0) if window else (0, -2)),
        lambda: cache.attend(z(1), z(1), z(1), out=np.zeros((2, 2, 1, 3), np.float32)),
        lambda: cache.trim(6),
    ]
    if window:
        refused.append(lambda: cache.trim(1))                      # the ring has wrapped
    for call in refused:
        with pytest.raises((InvalidParameterError, ShapeError, DTypeError)):
            call()
        np.testing.assert_array_equal(cache.lengths, before[2])
        assert cache.k.tobytes() == before[0].tobytes() and cache.v.tobytes() == before[1].tobytes()
