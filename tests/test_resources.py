"""Resources: no memory growth over many calls, impossible allocations raise
MemoryError, Ctrl-C is honoured within a second.

RSS is read from /proc/self/statm after a warm-up (NumPy's and the pool's
caches, the kernel's per-thread tiles are allocated by then). The bound,
4 MiB over 100,000 small calls, is what a leak of 40 bytes a call would
exceed; the noise (allocator fragmentation, page-granular RSS) measured here
is well under 1 MiB. Under AddressSanitizer (TILEATTN_SANITIZED=1) freed
memory is held in quarantine, so RSS says nothing and those tests skip.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import tileattn
from conftest import make_qkv

sdpa = tileattn.scaled_dot_product_attention
SANITIZED = os.environ.get("TILEATTN_SANITIZED") == "1"
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE



def assert_rss_flat(calls, *, warm, timed, label):
    """Runs the calls in turn, `warm` times untimed, then `timed` times; the
    resident set may not grow by 4 MiB or more over the timed ones."""
    for i in range(warm):
        calls[i % len(calls)]()
    before = rss()
    for i in range(timed):
        calls[i % len(calls)]()
    after = rss()
    print(f"RSS {label}: {before / MiB:.1f} -> {after / MiB:.1f} MiB")
    assert after - before < 4 * MiB, (before, after)

@pytest.mark.skipif(SANITIZED, reason="ASan's quarantine holds freed memory")
def test_no_rss_growth_over_100000_small_calls(rng, restore_threads):
    q, k, v = make_qkv(rng, 1, 2, 1, 4, 9, 8)
    kpm = np.ones((1, 9), bool)
    kpm[0, 3] = False
    calls = [lambda: sdpa(q, k, v), lambda: sdpa(q, k, v, is_causal=True),
             lambda: sdpa(q, k, v, key_padding_mask=kpm, return_weights=True),
             lambda: sdpa(q, k, v, window=(2, 0), dropout_p=0.1, seed=3)]
    assert_rss_flat(calls, warm=4000, timed=100_000, label="small calls")


@pytest.mark.skipif(SANITIZED, reason="ASan's quarantine holds freed memory")
def test_no_rss_growth_over_1000_large_calls(rng, restore_threads):
    q, k, v = make_qkv(rng, 1, 4, 2, 600, 700, 64)
    mask = rng.random((600, 700)) < 0.9
    calls = [lambda: sdpa(q, k, v, is_causal=True),
             lambda: sdpa(q, k, v, attn_mask=mask),
             lambda: sdpa(q[:, :, :2], k, v),           # the decode path
             lambda: sdpa(q, k, v, return_weights=True)]
    # one call's own arrays are ~7 MiB (the weights); growth must stay below that
    assert_rss_flat(calls, warm=40, timed=1000, label="large calls")


def test_impossible_weights_raise_memory_error():
    """return_weights at a shape whose weights need 32 TiB: MemoryError, before
    anything is computed, also with broadcast (zero-stride) K/V and enough
    queries to make the kernel want dense K/V copies."""
    one = np.ones((1, 1, 1, 4), np.float32)
    for lq, lk in [(100, 2**40), (2**14, 2**22)]:
        q = np.broadcast_to(one, (2, 64, lq, 4))
        kv = np.broadcast_to(one, (2, 64, lk, 4))
        before = rss()
        with pytest.raises(MemoryError):
            sdpa(q, kv, kv, return_weights=True)
        assert rss() - before < 64 * MiB


def test_impossible_sizes_elsewhere_raise_memory_error():
    with pytest.raises(MemoryError):
        tileattn.KVCache(2**10, 64, 2**30, 128)      # 32 TiB
    with pytest.raises(MemoryError):
        tileattn.MultiHeadAttention(10**6, 1)         # 7 TiB of weights
    with pytest.raises(MemoryError):
        tileattn.sinusoidal_positions(10**12, 64)


def test_kv_cache_past_numpy_sizes_raises_memory_error():
    with pytest.raises(MemoryError):
        tileattn.KVCache(2**20, 64, 2**30, 128)      # 2**65 bytes


def test_module_past_numpy_sizes_raises_memory_error():
    with pytest.raises(MemoryError):
        tileattn.MultiHeadAttention(10**12, 1)


INTERRUPT = r"""
import os, signal, threading, time, numpy as np, tileattn
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 16, 16384, 64), dtype=np.float32)
kv = rng.standard_normal((1, 8, 2**16, 64), dtype=np.float32)
cases = {"prefill": lambda: tileattn.scaled_dot_product_attention(q, q, q),
         "masked": lambda: tileattn.scaled_dot_product_attention(q, q, q, window=(4000, 0),
                                                                 return_weights=False),
         "decode": lambda: [tileattn.scaled_dot_product_attention(q[:, :, :1], kv, kv)
                            for _ in range(2000)]}
for name, fn in cases.items():
    sent = []
    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)
    threading.Timer(0.5, fire).start()
    try:
        fn()
        print(name, "not-interrupted")
    except KeyboardInterrupt:
        print(name, time.perf_counter() - sent[0])
small = q[:, :, :10]
print("after", tileattn.scaled_dot_product_attention(small, small, small).shape)
"""


@pytest.mark.parametrize("threads", ["1", "2"])
def test_keyboard_interrupt_latency(threads):
    """SIGINT during long prefill, windowed and decode calls: KeyboardInterrupt
    within a second of the signal (measured from the signal, not the call)."""
    env = dict(os.environ, TILEATTN_NUM_THREADS=threads)
    r = subprocess.run([sys.executable, "-c", INTERRUPT], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    print(f"interrupt latency, {threads} thread(s): {lines}")
    for name in ("prefill", "masked", "decode"):
        assert lines[name] != "not-interrupted", r.stdout
        assert float(lines[name]) < 1.0, r.stdout
    assert lines["after"] == "(1, 16, 10, 64)"
