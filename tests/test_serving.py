"""Serving: ragged batches through key lengths, many Python threads on shared
modules, set_num_threads under load, and fork()ed workers."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import tileattn
from tileattn import DTypeError, InvalidParameterError, KVCache, ShapeError
from conftest import make_qkv
from reference import assert_close_to_reference

sdpa = tileattn.scaled_dot_product_attention


# -- key lengths ----------------------------------------------------------------
@pytest.mark.parametrize("lq", [1, 3, 120])
@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(window=9)])
def test_key_lengths_each_item_as_if_alone(rng, lq, kw):
    """Keys past an item's length are never read: NaN there changes nothing,
    and each item equals the same call on its own keys."""
    b, lk = 4, 300
    q, k, v = make_qkv(rng, b, 4, 2, lq, lk, 16)
    lengths = np.array([300, 150, lq, 0 if lq == 1 else 1])
    for i, n in enumerate(lengths):
        k[i, :, n:] = np.nan
        v[i, :, n:] = np.inf
    got = sdpa(q, k, v, key_lengths=lengths, **kw)
    assert np.isfinite(got).all()
    for i, n in enumerate(lengths):
        alone = sdpa(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], **kw)
        np.testing.assert_array_equal(got[i:i + 1], alone)
        if n:
            assert_close_to_reference(got[i:i + 1], q[i:i + 1], k[i:i + 1, :, :n],
                                      v[i:i + 1, :, :n], **kw)
    assert not got[3 if lq == 1 else 4:].any()


def test_key_lengths_unbatched_and_lists(rng):
    q, k, v = make_qkv(rng, 1, 2, 2, 5, 20, 8, batched=False)
    np.testing.assert_array_equal(sdpa(q, k, v, key_lengths=7), sdpa(q, k[:, :7], v[:, :7]))
    q4, k4, v4 = make_qkv(rng, 2, 2, 1, 5, 20, 8)
    np.testing.assert_array_equal(sdpa(q4, k4, v4, key_lengths=[20, 3])[1:],
                                  sdpa(q4[1:], k4[1:, :, :3], v4[1:, :, :3]))


def test_prefix_padding_mask_becomes_key_lengths(rng):
    """A prefix-form padding mask stops the kernel at each row's end (so the
    keys after it are not even read) and gives the same bits as key_lengths."""
    q, k, v = make_qkv(rng, 3, 4, 2, 7, 200, 16)
    lengths = np.array([200, 31, 0])
    kpm = np.arange(200)[None, :] < lengths[:, None]
    k[1, :, 31:] = np.nan
    got = sdpa(q, k, v, key_padding_mask=kpm)
    np.testing.assert_array_equal(got, sdpa(q, k, v, key_lengths=lengths))
    assert np.isfinite(got).all() and not got[2].any()
    k[1, :, 31:] = 0
    assert_close_to_reference(got, q, k, v, key_padding_mask=kpm)
    # Not a prefix (a hole), or causal: the mask keeps its own meaning.
    holes = kpm.copy()
    holes[0, 5] = False
    assert_close_to_reference(sdpa(q, k, v, key_padding_mask=holes), q, k, v,
                              key_padding_mask=holes)
    assert_close_to_reference(sdpa(q, k, v, key_padding_mask=kpm, is_causal=True), q, k, v,
                              key_padding_mask=kpm, is_causal=True)


def test_key_lengths_errors(rng):
    q, k, v = make_qkv(rng, 2, 2, 2, 3, 10, 8)
    with pytest.raises(InvalidParameterError, match="key_lengths: entry 1 is 11.*Lk = 10"):
        sdpa(q, k, v, key_lengths=[3, 11])
    with pytest.raises(InvalidParameterError, match="key_lengths: entry 0 is -1"):
        sdpa(q, k, v, key_lengths=[-1, 1])
    with pytest.raises(ShapeError, match=r"key_lengths: expected shape \(B,\) = \(2,\)"):
        sdpa(q, k, v, key_lengths=[3])
    with pytest.raises(ShapeError, match="key_lengths: expected shape a scalar"):
        sdpa(q[0], k[0], v[0], key_lengths=[3])
    with pytest.raises(DTypeError, match="key_lengths: expected integers"):
        sdpa(q, k, v, key_lengths=[3.0, 4.0])
    with pytest.raises(DTypeError, match="key_lengths: expected integers"):
        sdpa(q, k, v, key_lengths=True)


# -- threads ----------------------------------------------------------------------
def serving_workload(mods, xs, seed):
    """What one request thread does: a full causal pass, a cached decode of a
    prompt plus steps (float32 and float16 caches), and ragged attention."""
    rng = np.random.default_rng(seed)
    m = mods[seed % len(mods)]
    x = xs[seed % len(xs)]
    out = [m(x, is_causal=True)]
    for dtype in (np.float32, np.float16):
        cache = KVCache(x.shape[0], m.num_kv_heads, x.shape[1], m.head_dim, dtype=dtype,
                        window=None if seed % 3 else 8)
        out.append(m(x[:, :9], is_causal=True, cache=cache))
        out.extend(m(x[:, i:i + 1], is_causal=True, cache=cache) for i in range(9, 14))
    q, k, v = make_qkv(rng, 2, 4, 2, 2, 257, 32)
    out.append(sdpa(q, k, v, key_lengths=[257, 100], is_causal=True))
    return out


@pytest.fixture(scope="module")
def shared():
    mods = [tileattn.MultiHeadAttention(64, 8, num_kv_heads=2, rope=True, seed=1),
            tileattn.MultiHeadAttention(64, 4, qk_norm=True, seed=2)]
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((2, 14, 64)).astype(np.float32) for _ in range(3)]
    return mods, xs


def run_threads(target, n, timeout=120):
    errors = []

    def wrapped(i):
        try:
            target(i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=wrapped, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors


def test_eight_threads_on_shared_modules_match_serial(shared, restore_threads):
    mods, xs = shared
    calls = 6
    serial = {s: serving_workload(mods, xs, s) for s in range(8 * calls)}
    got = {}

    def worker(i):
        for j in range(calls):
            s = i * calls + j
            got[s] = serving_workload(mods, xs, s)

    run_threads(worker, 8)
    assert sorted(got) == sorted(serial)
    for s, outs in serial.items():
        for a, b in zip(outs, got[s]):
            np.testing.assert_array_equal(a, b)


def test_set_num_threads_under_load_does_not_deadlock(shared, restore_threads):
    mods, xs = shared
    want = {s: serving_workload(mods, xs, s) for s in range(4)}
    done = threading.Event()

    def worker(i):
        try:
            if i == 8:                      # the thread that keeps changing the pool
                n = 0
                while not done.is_set():
                    tileattn.set_num_threads(1 + n % 3)
                    n += 1
                return
            for j in range(5):
                for a, b in zip(want[(i + j) % 4], serving_workload(mods, xs, (i + j) % 4)):
                    np.testing.assert_array_equal(a, b)
        finally:
            if i == 0:
                done.set()

    run_threads(worker, 9)
    done.set()


# -- fork ---------------------------------------------------------------------------
FORK_SCRIPT = r"""
import multiprocessing as mp, os, sys, threading
import numpy as np, tileattn

m = tileattn.MultiHeadAttention(64, 8, num_kv_heads=2, rope=True, seed=1)
x = np.random.default_rng(0).standard_normal((2, 20, 64)).astype(np.float32)

def decode(seed):
    cache = tileattn.KVCache(2, 2, 20, 8, dtype=np.float16 if seed % 2 else np.float32)
    ys = [m(x[:, :12], is_causal=True, cache=cache)]
    ys += [m(x[:, i:i + 1], is_causal=True, cache=cache) for i in range(12, 20)]
    return np.concatenate(ys, axis=1)

want = [decode(s) for s in range(4)]

# Other threads keep the pool busy while we fork: the child must not inherit
# a pool stuck on a lock some parent thread held.
stop = threading.Event()
def busy():
    q = np.random.default_rng(1).standard_normal((1, 8, 600, 64)).astype(np.float32)
    while not stop.is_set():
        tileattn.scaled_dot_product_attention(q, q, q, is_causal=True)
busy_threads = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
for t in busy_threads:
    t.start()

for trial in range(3):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        ok = all(np.array_equal(decode(s), want[s]) for s in range(4))
        tileattn.set_num_threads(1)
        ok = ok and np.array_equal(decode(1), want[1])
        os.write(w, b"ok" if ok else b"mismatch")
        os._exit(0)
    os.close(w)
    msg = os.read(r, 16)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert msg == b"ok" and os.waitstatus_to_exitcode(status) == 0, (msg, status)

ctx = mp.get_context("fork")
with ctx.Pool(2) as pool:
    got = pool.map(decode, range(4), chunksize=1)
stop.set()
for t in busy_threads:
    t.join()
assert all(np.array_equal(a, b) for a, b in zip(got, want))
print("fork ok")
"""


def test_forked_children_decode_while_parent_threads_compute():
    r = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "TILEATTN_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("fork ok")


# -- interpreter shutdown ------------------------------------------------------------
SHUTDOWN_SCRIPT = r"""
import sys, threading, time
import numpy as np, tileattn

q = np.random.default_rng(0).standard_normal((1, 8, 2000, 64)).astype(np.float32)
cache = tileattn.KVCache(1, 8, 64, 64, dtype=np.float16)

def busy():
    while True:
        tileattn.scaled_dot_product_attention(q, q, q, is_causal=True)

for _ in range(2):
    threading.Thread(target=busy, daemon=True).start()
cache.attend(q[:, :, :1], q[:, :, :1], q[:, :, :1])
time.sleep(0.3)
print("exiting", flush=True)
sys.exit(0)
"""


def test_interpreter_exits_cleanly_while_daemon_threads_compute():
    r = subprocess.run([sys.executable, "-c", SHUTDOWN_SCRIPT], capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == "exiting"
    assert r.returncode == 0, r.stderr
