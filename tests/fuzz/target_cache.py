"""Fuzz target: KVCache, its construction and a drawn sequence of append,
attend, trim, reset and contents, checked against a float64 history of what
was appended."""

from __future__ import annotations

import numpy as np
import tileattn
from hypothesis import strategies as st
from reference import assert_close_to_reference
from tileattn import DTypeError, InvalidParameterError, ShapeError

from .harness import (BAD, EITHER, HUGE, Expect, Fail, must_have_raised, run_expecting,
                      start_case)


@st.composite
def cache_cases(draw):
    c = {"seed": draw(st.integers(0, 2**32 - 1))}
    c["ctor"] = {"batch": draw(st.sampled_from([1, 2, 3])),
                 "num_kv_heads": draw(st.sampled_from([1, 2])),
                 "max_len": draw(st.sampled_from([1, 5, 40, 300])),
                 "head_dim": draw(st.sampled_from([1, 4, 16])),
                 "value_dim": draw(st.sampled_from([None, 3])),
                 "dtype": draw(st.sampled_from(["float32", "float16", "float64"])),
                 "window": draw(st.sampled_from([None, None, 1, 4, 30]))}
    c["ctor_bad"] = draw(st.sampled_from([None, None, None, ("batch", 0), ("num_kv_heads", -1),
                                          ("max_len", 2.5), ("head_dim", "4"),
                                          ("value_dim", 0), ("dtype", "int8"),
                                          ("window", 0), ("max_len", 10**15),
                                          ("batch", True)]))
    c["ops"] = draw(st.lists(st.tuples(
        st.sampled_from(["attend", "attend", "append", "trim", "reset", "contents", "bad"]),
        st.integers(0, 2**16)), min_size=1, max_size=6))
    return c


def target_cache(c):
    start_case(c)
    rng = np.random.default_rng(c["seed"])
    ctor = dict(c["ctor"])
    e = Expect()
    if c["ctor_bad"]:
        name, bad = c["ctor_bad"]
        ctor[name] = bad
        if bad == 10**15:
            e.add(HUGE, {"max_len", "batch"})
            if ctor["window"] is not None:
                e = Expect()  # a ring is allocated at its window: fine
        else:
            e.add(BAD, name, (DTypeError,) if name == "dtype" else (InvalidParameterError,))
    ok, cache = run_expecting(e, lambda: tileattn.KVCache(**ctor))
    if not ok:
        return
    if e.kind == HUGE:
        raise Fail("a 10**15-row cache was allocated")
    must_have_raised(e)
    B, H = cache.batch, cache.num_kv_heads
    D, Dv, dt = cache.head_dim, cache.value_dim, cache.dtype
    qdt = np.float64 if dt == np.float64 else np.float32
    hist_k = [np.zeros((H, 0, D)) for _ in range(B)]
    hist_v = [np.zeros((H, 0, Dv)) for _ in range(B)]
    for op, s in c["ops"]:
        r = np.random.default_rng(s)
        t = int(r.integers(0, 6))
        lengths = np.array([h.shape[1] for h in hist_k])
        if op in ("attend", "append", "bad"):
            k = r.standard_normal((B, H, t, D)).astype(qdt)
            v = r.standard_normal((B, H, t, Dv)).astype(qdt)
            counts = None if r.random() < 0.6 else r.integers(0, t + 1, B)
            ee = Expect()
            n_new = np.full(B, t) if counts is None else counts
            if (lengths + n_new > cache.max_len).any():
                ee.add(BAD, {"max_len", "k", "v", "counts"}, (InvalidParameterError,))
            if op == "bad":
                which = int(r.integers(0, 4))
                if which == 0:
                    k = k[..., :-1] if D > 1 else k[..., :0]
                    ee.add(BAD, {"k", "v"}, (ShapeError,))
                elif which == 1:
                    v = v[:, :, :max(t - 1, 0)] if t else np.concatenate([v, v[:, :, :0]], 2)
                    if t:
                        ee.add(BAD, {"k", "v"}, (ShapeError,))
                elif which == 2:
                    k = k.astype(np.int32)
                    ee.add(BAD, {"k"}, (DTypeError,))
                else:
                    counts = np.full(B, t + 1)
                    ee.add(BAD, {"counts"}, (InvalidParameterError,))
            if op in ("attend", "bad"):
                hq = H * int(r.integers(1, 3))
                q = r.standard_normal((B, hq, t, D)).astype(qdt)
                causal = bool(r.random() < 0.7) or cache.window is not None
                ok, out = run_expecting(ee, lambda: cache.attend(q, k, v, counts=counts,
                                                                 is_causal=causal))
            else:
                ok, out = run_expecting(ee, lambda: cache.append(k, v, counts=counts))
            if not ok:
                if not np.array_equal(cache.lengths, lengths):
                    raise Fail("a refused append changed the lengths")
                continue
            must_have_raised(ee)
            for bi in range(B):
                n = int(n_new[bi])
                kk = k[bi, :, :n].astype(dt).astype(np.float64)
                vv = v[bi, :, :n].astype(dt).astype(np.float64)
                hist_k[bi] = np.concatenate([hist_k[bi], kk], axis=1)
                hist_v[bi] = np.concatenate([hist_v[bi], vv], axis=1)
            if not np.array_equal(cache.lengths, [h.shape[1] for h in hist_k]):
                raise Fail(f"lengths {cache.lengths} != {[h.shape[1] for h in hist_k]}")
            if op in ("attend", "bad"):
                for bi in range(B):
                    n = int(n_new[bi])
                    kk = hist_k[bi][None].astype(qdt)
                    vv = hist_v[bi][None].astype(qdt)
                    kw = {"is_causal": causal}
                    if cache.window is not None:
                        kw["window"] = cache.window
                    got = out[bi:bi + 1, :, :n]
                    assert_close_to_reference(got, q[bi:bi + 1, :, :n], kk, vv, **kw)
                    if out[bi, :, n:].any():
                        raise Fail("padding rows of attend's output are not zero")
        elif op == "trim":
            n = int(r.integers(-1, 4))
            ee = Expect()
            over = (lengths < n).any() or n < 0
            ring_blocked = cache.window is not None and (lengths > cache.window).any() and n > 0
            if over:
                ee.add(BAD, {"n", "trim"}, (InvalidParameterError,))
            elif ring_blocked:
                ee.add(EITHER, {"n", "trim", "window", "ring"}, (InvalidParameterError,))
            ok, _ = run_expecting(ee, lambda: cache.trim(n))
            if ok:
                must_have_raised(ee)
                hist_k = [h[:, :h.shape[1] - n] for h in hist_k]
                hist_v = [h[:, :h.shape[1] - n] for h in hist_v]
            elif not np.array_equal(cache.lengths, lengths):
                raise Fail("a refused trim changed the lengths")
        elif op == "reset":
            cache.reset()
            hist_k = [h[:, :0] for h in hist_k]
            hist_v = [h[:, :0] for h in hist_v]
        elif op == "contents":
            bi = int(r.integers(-1, B + 1))
            ee = Expect()
            if not 0 <= bi < B:
                ee.add(BAD, {"b"}, (InvalidParameterError,))
            ok, kv = run_expecting(ee, lambda: cache.contents(bi))
            if ok:
                must_have_raised(ee)
                kk, vv = kv
                keep = hist_k[bi].shape[1] if cache.window is None else \
                    min(cache.window, hist_k[bi].shape[1])
                if not (np.array_equal(np.asarray(kk, np.float64),
                                       hist_k[bi][:, hist_k[bi].shape[1] - keep:])
                        and np.array_equal(np.asarray(vv, np.float64),
                                           hist_v[bi][:, hist_v[bi].shape[1] - keep:])):
                    raise Fail(f"contents({bi}) differ from what was appended")
