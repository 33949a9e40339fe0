"""Numerical edge cases with asserted results, on every ISA path: huge
logits, rows masked in whole key blocks, a single visible key, float16 at
the edges of its range, extreme head sizes, lengths at every tile boundary.

The kernel takes queries in blocks of 96 rows and keys in blocks of up to
240; the lengths below sit on each side of one, two, five and ten blocks."""

import os
import subprocess
import sys

import numpy as np
import pytest

import tileattn
from conftest import make_qkv
from reference import assert_close_to_reference, attention

sdpa = tileattn.scaled_dot_product_attention

BOUNDARIES = [95, 96, 97, 191, 192, 193, 239, 240, 241, 479, 480, 481, 959, 960, 961]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_huge_logits_softmax_sums_to_one(each_isa, rng, dtype, magnitude):
    """Scores up to +-magnitude (scale 1): weights still sum to 1 and the
    output is the oracle's (the running max keeps every exp in range)."""
    q, k, v = make_qkv(rng, 1, 2, 2, 100, 500, 16, dtype=dtype)
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64))
    q = (q * (magnitude / np.abs(s).max())).astype(dtype)
    out, w = sdpa(q, k, v, scale=1.0, return_weights=True)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=4 * np.finfo(dtype).eps * 500)
    assert w.min() >= 0
    if dtype == np.float32:
        assert_close_to_reference(out, q, k, v, weights=w, scale=1.0)
        return
    # float64: an error of |s| * eps in a score becomes a relative error of
    # |s| * eps in its weight, so "64 roundings" cannot hold at |s| = 1e4 for
    # any float64 method. The float32 rule instead: the oracle in long double,
    # the budget twice what plain NumPy float64 gets (RMS), 4x its max.
    want, want_w = attention(q, k, v, scale=1.0, dtype=np.longdouble)
    plain, plain_w = attention(q, k, v, scale=1.0, dtype=np.float64)
    for got, oracle, base in ((out, want, plain), (w, want_w, plain_w)):
        err = np.abs(got.astype(np.longdouble) - oracle)
        ref = np.abs(base.astype(np.longdouble) - oracle)
        floor = np.finfo(np.float64).eps * float(np.abs(oracle).max())
        assert float(np.sqrt(np.mean(err**2))) <= 2 * float(np.sqrt(np.mean(ref**2))) + floor
        assert float(err.max()) <= 4 * float(ref.max()) + floor


@pytest.mark.parametrize("hidden", [240, 480, 481, 959])
@pytest.mark.parametrize("kind", ["bool", "float", "padding"])
def test_rows_masked_in_their_first_key_blocks(each_isa, rng, hidden, kind):
    """Every key of the first block(s) hidden, later keys visible: the online
    softmax starts from a block with no visible key and must not be poisoned."""
    lq, lk = 200, 1000
    q, k, v = make_qkv(rng, 2, 2, 2, lq, lk, 16)
    mask = np.ones((lq, lk), bool)
    mask[:, :hidden] = False
    mask[::7, hidden: hidden + 5] = False   # some rows see their first key later still
    kw = {"bool": dict(attn_mask=mask),
          "float": dict(attn_mask=np.where(mask, 0.0, -np.inf).astype(np.float32)),
          "padding": dict(key_padding_mask=np.broadcast_to(mask[0], (2, lk)))}[kind]
    out, w = sdpa(q, k, v, return_weights=True, **kw)
    assert not w[..., :hidden].any()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert_close_to_reference(out, q, k, v, weights=w, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lq", [1, 3, 100])   # the decode path and the blocked path
def test_single_visible_key_gives_its_value(each_isa, rng, dtype, lq):
    lk = 700
    q, k, v = make_qkv(rng, 1, 2, 2, lq, lk, 32, dtype=dtype)
    pick = rng.integers(0, lk, lq)
    mask = np.zeros((lq, lk), bool)
    mask[np.arange(lq), pick] = True
    want = v[0][:, pick]                      # (H, Lq, D)
    for m in (mask, np.where(mask, 0.0, -np.inf).astype(dtype)):
        out, w = sdpa(q, k, v, attn_mask=m, return_weights=True)
        # weight exp(0) / 1 = 1 exactly, times v: exact
        np.testing.assert_array_equal(w[0][:, np.arange(lq), pick], 1.0)
        np.testing.assert_array_equal(out[0], want)
    # a window of one key (the diagonal): each query sees only itself
    qq, kk, vv = make_qkv(rng, 1, 1, 1, 300, 300, 8, dtype=dtype)
    np.testing.assert_array_equal(sdpa(qq, kk, vv, window=(0, 0)), vv)


def test_float16_near_the_top_of_its_range(each_isa, rng):
    """Values ~6e4 (float16 max 65504): computed in float32, no overflow."""
    q, k, v = make_qkv(rng, 1, 2, 2, 150, 300, 16, dtype=np.float32)
    v16 = np.clip(v * 2e4, -6.5e4, 6.5e4).astype(np.float16)
    v16[..., 0] = np.float16(65504)           # a column of the largest finite value
    q16, k16 = (q * 0.5).astype(np.float16), (k * 0.5).astype(np.float16)
    out = sdpa(q16, k16, v16, is_causal=True)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    np.testing.assert_array_equal(out[..., 0], np.float16(65504))
    assert_close_to_reference(out, q16, k16, v16, is_causal=True)
    # large q/k: scores ~1e4 from float16 inputs of a few hundred
    big_q = (q * 300).astype(np.float16)
    out = sdpa(big_q, k16, v16)
    assert np.isfinite(out).all()
    assert_close_to_reference(out, big_q, k16, v16)


def test_float16_subnormals(each_isa, rng):
    tiny = np.float16(2.0**-24)                # the smallest float16 subnormal
    q, k, v = make_qkv(rng, 1, 2, 2, 100, 250, 8, dtype=np.float32)
    q16 = (q * 1e-6).astype(np.float16)        # subnormal queries: scores ~0
    v16 = (np.sign(v) * tiny * rng.integers(1, 1000, v.shape)).astype(np.float16)
    out = sdpa(q16, k.astype(np.float16), v16)
    assert out.dtype == np.float16 and np.isfinite(out).all()
    assert_close_to_reference(out, q16, k.astype(np.float16), v16)
    # all-subnormal values averaged: the result stays subnormal, not flushed to zero
    out = sdpa(q16, k.astype(np.float16), np.full(v.shape, tiny * 3, np.float16))
    np.testing.assert_array_equal(out, tiny * 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 512])
def test_extreme_head_dims(each_isa, rng, dtype, d):
    q, k, v = make_qkv(rng, 1, 2, 1, 130, 250, d, dtype=dtype)
    for kw in (dict(), dict(is_causal=True), dict(window=(40, 3))):
        assert_close_to_reference(sdpa(q, k, v, **kw), q, k, v, **kw)
    # the decode path too
    assert_close_to_reference(sdpa(q[:, :, :2], k, v), q[:, :, :2], k, v)


@pytest.mark.parametrize("length", BOUNDARIES)
def test_lengths_at_tile_boundaries(each_isa, rng, length):
    other = BOUNDARIES[(BOUNDARIES.index(length) * 7 + 4) % len(BOUNDARIES)]
    for lq, lk in ((length, length), (length, other), (other, length)):
        q, k, v = make_qkv(rng, 1, 1, 1, lq, lk, 16)
        assert_close_to_reference(sdpa(q, k, v), q, k, v)
        assert_close_to_reference(sdpa(q, k, v, is_causal=True), q, k, v, is_causal=True)
    q, k, v = make_qkv(rng, 1, 2, 1, length, length, 8, dtype=np.float64)
    assert_close_to_reference(sdpa(q, k, v, window=(100, 0)), q, k, v, window=(100, 0))


# -- regressions for bugs the fuzz suite found in the Python layer ---------------------
def test_window_bounds_past_int64_are_unbounded(rng):
    q, k, v = make_qkv(rng, 1, 1, 1, 50, 70, 8)
    full = sdpa(q, k, v)
    for w in [(2**63, 2**63), (10**30, -1), (-1, 2**64), (2**63 - 1, 2**63 - 1)]:
        np.testing.assert_array_equal(sdpa(q, k, v, window=w), full)
    np.testing.assert_array_equal(sdpa(q, k, v, window=2**70), sdpa(q, k, v, is_causal=True))


def test_out_is_returned_for_unbatched_inputs(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 5, 6, 4, batched=False)
    out = np.empty((2, 5, 4), np.float32)
    assert sdpa(q, k, v, out=out) is out


def test_sinusoidal_positions_beyond_numpy_sizes():
    with pytest.raises(MemoryError, match="sinusoidal_positions"):
        tileattn.sinusoidal_positions(2**63, 1)
    with pytest.raises(MemoryError, match="sinusoidal_positions"):
        tileattn.sinusoidal_positions(1, 2**70)


# -- C++ bugs once caught here (their fixes keep these tests) ---------------------------
@pytest.mark.parametrize("lq", [1, 200])
def test_nan_in_q_or_k_propagates(each_isa, lq):
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, 1, 1, 1, lq, 2, 4)
    qn = q.copy()
    qn[0, 0, 0, 0] = np.nan
    kn = k.copy()
    kn[0, 0, 0, 0] = np.nan
    assert np.isnan(sdpa(qn, k, v)[0, 0, 0]).all()   # the row sees NaN scores
    assert np.isnan(sdpa(q, kn, v)[0, 0]).all()      # every row sees key 0


def test_values_of_hidden_keys_stay_out_of_every_block(each_isa, rng):
    """NaN and inf in V rows no query can see (padding of item 0, a causal
    future for item 1) leave the output bitwise as with clean rows, in every
    query block; a non-finite value a row does see reaches that row. The
    kernel checks each V block for non-finite values once per call and
    shares the answer between query blocks."""
    q, k, v = make_qkv(rng, 2, 2, 2, 300, 500, 16)
    kpm = np.ones((2, 500), bool)
    kpm[0, 260:] = False
    clean = sdpa(q, k, v, key_padding_mask=kpm, is_causal=True)
    vg = v.copy()
    vg[0, :, 300:] = np.nan      # padding: hidden from every row of item 0
    vg[1, :, 497:] = np.inf      # causal: the 300 queries end at key 499 ...
    vg[1, 0, 499] = 1.0          # ... so only key 499 of head 0 could be seen
    vg[1, 1, 499] = np.nan       # head 1: the last query sees a NaN value
    got = sdpa(q, k, vg, key_padding_mask=kpm, is_causal=True)
    np.testing.assert_array_equal(got[0], clean[0])
    np.testing.assert_array_equal(got[1, :, :297], clean[1, :, :297])
    assert np.isinf(got[1, :, 297:299]).any() and np.isnan(got[1, 1, 299]).all()


SANITIZED = os.environ.get("TILEATTN_SANITIZED") == "1"


@pytest.mark.skipif(not SANITIZED, reason="signed overflow is only seen by UBSan (.ci/sanitize.sh)")
def test_core_window_bounds_near_int64_max_do_not_overflow(tmp_path):
    code = (
        "import numpy as np, tileattn\n"
        "q = np.ones((1, 1, 300, 8), np.float32)\n"
        "out = np.empty_like(q)\n"
        "for left, right in [(0, 2**63 - 1), (2**63 - 1, 0), (2**63 - 1, 2**63 - 1)]:\n"
        "    tileattn._core.attention_forward(q, q, q, out, tileattn._core.AttentionOptions(\n"
        "        scale=1.0, window_left=left, window_right=right))\n"
    )
    env = dict(os.environ, UBSAN_OPTIONS=f"halt_on_error=1:log_path={tmp_path}/ubsan")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    reports = "".join(p.read_text() for p in tmp_path.glob("ubsan*"))
    assert r.returncode == 0 and "runtime error" not in reports + r.stderr, reports + r.stderr


@pytest.mark.parametrize("left,right", [(2**63 - 1, 0), (0, 2**63 - 1), (2**63 - 1, 2**63 - 1),
                                        (700, 300)])
def test_core_window_bounds_past_the_keys_mean_unbounded(each_isa, left, right):
    # The core stores a bound of Lq + Lk or more as "unbounded" (-1): same result.
    rng = np.random.default_rng(3)
    q, k, v = make_qkv(rng, 1, 2, 2, 300, 400, 8)
    out = np.empty_like(q)
    tileattn._core.attention_forward(q, k, v, out, tileattn._core.AttentionOptions(
        scale=0.35, window_left=left, window_right=right))
    assert_close_to_reference(out, q, k, v, scale=0.35,
                              window=(min(left, 2**40), min(right, 2**40)))
