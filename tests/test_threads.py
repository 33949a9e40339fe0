"""Threads: bitwise determinism across thread counts, the pool's controls."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import tileattn
from conftest import make_qkv

sdpa = tileattn.scaled_dot_product_attention


def run_all_kinds(q, k, v, kpm, mask):
    return [
        sdpa(q, k, v),
        sdpa(q, k, v, is_causal=True),
        sdpa(q, k, v, window=(50, 10), key_padding_mask=kpm),
        sdpa(q, k, v, attn_mask=mask, dropout_p=0.2, seed=5),
        sdpa(q, k, v, is_causal=True, return_weights=True)[1],
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_identical_across_thread_counts(each_isa, rng, restore_threads, dtype):
    q, k, v = make_qkv(rng, 2, 4, 2, 300, 530, 32, dtype=dtype)
    kpm = rng.random((2, 530)) < 0.8
    mask = rng.random((300, 530)) < 0.9
    results = {}
    for n in (1, 2, 3, 4):
        tileattn.set_num_threads(n)
        assert tileattn.get_num_threads() == n
        results[n] = run_all_kinds(q, k, v, kpm, mask)
    for n in (2, 3, 4):
        for a, b in zip(results[1], results[n]):
            np.testing.assert_array_equal(a, b)


def test_set_num_threads_rejects_bad_values(restore_threads):
    for bad in (0, -1, 10**6, 2.5, "2", True, None):
        with pytest.raises(tileattn.InvalidParameterError, match="set_num_threads"):
            tileattn.set_num_threads(bad)
    tileattn.set_num_threads(np.int64(2))
    assert tileattn.get_num_threads() == 2


def test_concurrent_callers_match_serial(rng, restore_threads):
    q, k, v = make_qkv(rng, 1, 4, 4, 200, 200, 32)
    want = sdpa(q, k, v, is_causal=True)
    errors, outputs = [], []

    def worker(i):
        try:
            for j in range(10):
                if i == 0 and j % 3 == 0:
                    tileattn.set_num_threads(1 + j % 2)
                outputs.append(sdpa(q, k, v, is_causal=True))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors
    assert len(outputs) == 60
    for o in outputs:
        np.testing.assert_array_equal(o, want)


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_env_sets_default_thread_count():
    r = run_python("import tileattn; print(tileattn.get_num_threads())", TILEATTN_NUM_THREADS="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"


def test_env_bad_thread_count_warns_and_uses_default():
    r = run_python("import tileattn; print(tileattn.get_num_threads())",
                   TILEATTN_NUM_THREADS="lots")
    assert r.returncode == 0, r.stderr
    assert "TILEATTN_NUM_THREADS" in r.stderr and "RuntimeWarning" in r.stderr
    assert int(r.stdout.strip()) >= 1


def test_default_is_cpus_available():
    r = run_python("import os, tileattn; print(tileattn.get_num_threads(), "
                   "len(os.sched_getaffinity(0)))", TILEATTN_NUM_THREADS="")
    assert r.returncode == 0, r.stderr
    got, want = r.stdout.split()
    assert got == want


def test_isa_env_forces_and_refuses():
    for isa in tileattn._core.isas_supported():
        r = run_python("import tileattn; print(tileattn.config()['isa_path_in_use'])",
                       TILEATTN_ISA=isa)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa
    r = run_python("import tileattn", TILEATTN_ISA="sse9")
    assert r.returncode != 0 and "TILEATTN_ISA" in r.stderr
    missing = [i for i in ("avx512", "avx2") if i not in tileattn._core.isas_supported()]
    if missing:
        r = run_python("import tileattn", TILEATTN_ISA=missing[0])
        assert r.returncode != 0 and "cannot run" in r.stderr


def test_fork_child_can_compute(rng):
    code = (
        "import os, numpy as np, tileattn\n"
        "q = np.random.default_rng(0).standard_normal((1, 4, 300, 32)).astype(np.float32)\n"
        "want = tileattn.scaled_dot_product_attention(q, q, q)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    got = tileattn.scaled_dot_product_attention(q, q, q)\n"
        "    os._exit(0 if np.array_equal(got, want) else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status))\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"


def test_worker_exception_reaches_python(restore_threads):
    for n in (1, 2, 3):
        tileattn.set_num_threads(n)
        assert tileattn._core._parallel_probe(1000, -1) == 1000
        with pytest.raises(RuntimeError, match="task 517 failed"):
            tileattn._core._parallel_probe(1000, 517)
        assert tileattn._core._parallel_probe(50, -1) == 50  # the pool still works


@pytest.mark.parametrize("threads", ["1", "2"])
def test_keyboard_interrupt_stops_a_long_call_within_a_second(threads):
    """SIGINT half a second into a call that would take far longer: the call
    raises KeyboardInterrupt within a second, and the pool works afterwards."""
    code = (
        "import os, signal, threading, time, numpy as np, tileattn\n"
        "q = np.random.default_rng(0).standard_normal((1, 16, 16384, 64), dtype=np.float32)\n"
        "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    tileattn._core._spin_probe(4, 60.0)\n"
        "    print('spin not interrupted')\n"
        "except KeyboardInterrupt:\n"
        "    print('spin', time.perf_counter() - t)\n"
        "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()\n"
        "t = time.perf_counter()\n"
        "try:\n"
        "    tileattn.scaled_dot_product_attention(q, q, q)\n"
        "    print('attention not interrupted', time.perf_counter() - t)\n"
        "except KeyboardInterrupt:\n"
        "    print('attention', time.perf_counter() - t)\n"
        "small = q[:, :, :10]\n"
        "print('after', tileattn.scaled_dot_product_attention(small, small, small).shape)\n"
    )
    r = run_python(code, TILEATTN_NUM_THREADS=threads)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    assert float(lines["spin"]) < 1.5  # signal at 0.5 s, honoured within 1 s
    assert float(lines["attention"]) < 1.5
    assert lines["after"] == "(1, 16, 10, 64)"


@pytest.mark.parametrize("how", ["padding_mask", "key_lengths", "scattered_padding"])
def test_sequence_alone_equals_inside_a_padded_batch_for_any_threads(each_isa, rng,
                                                                     restore_threads, how):
    """One sequence gives the same bits alone as at any position of a larger
    batch of other sequences padded to a common length, for 1..4 threads."""
    lens = [37, 300, 5, 251]
    lmax = max(lens)
    d = 32
    seqs = [make_qkv(rng, 1, 4, 2, n, n, d) for n in lens]
    batch = [np.zeros((4, h, lmax, d), np.float32) for h in (4, 2, 2)]
    kpm = np.zeros((4, lmax), bool)
    for b, (n, arrays) in enumerate(zip(lens, seqs)):
        for big, a in zip(batch, arrays):
            big[b, :, :n] = a[0]
            big[b, :, n:] = rng.standard_normal(big[b, :, n:].shape)  # padding holds junk
        kpm[b, :n] = True
    kw = {"key_lengths": np.array(lens)} if how == "key_lengths" else {"key_padding_mask": kpm}
    if how == "scattered_padding":
        # not of prefix form (no key-lengths shortcut): a hidden key inside each row
        for b, n in enumerate(lens):
            if n > 2:
                kpm[b, 1] = False
    for n_threads in (1, 2, 3, 4):
        tileattn.set_num_threads(n_threads)
        out = sdpa(*batch, **kw)
        for b, (n, (q, k, v)) in enumerate(zip(lens, seqs)):
            alone_kpm = kpm[b:b + 1, :n] if how == "scattered_padding" else None
            alone = sdpa(q, k, v, key_padding_mask=alone_kpm)
            np.testing.assert_array_equal(out[b:b + 1, :, :n], alone)
