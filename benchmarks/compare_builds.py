"""Two builds of tileattn, paired: the same calls timed in alternating
child processes (one build per process: both are the package ``tileattn``).

    python benchmarks/compare_builds.py OLD_PYTHONPATH NEW_PYTHONPATH [--rounds 11]

Each path is a directory holding a built ``tileattn`` package (for example a
checkout's ``python/`` with its ``_core*.so`` built in place, or the
site-packages of a venv). Every round runs each build once, the order
alternating, and each child reports the median of several calls per case;
the table gives the medians over rounds and old/new (above 1: new faster).
The cases cover the attention kernels' mask paths (none, causal, window,
key padding, additive mask), decode, the backward, and the modules, so a
refactor that must keep speed is checked where its code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List


def _median_time(fn: Callable[[], object], n: int = 5) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def child() -> None:
    import numpy as np
    import tileattn as ta

    rng = np.random.default_rng(0)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    sdpa = ta.scaled_dot_product_attention
    q, k, v = r(1, 16, 1024, 64), r(1, 16, 1024, 64), r(1, 16, 1024, 64)
    kpm = np.ones((1, 1024), bool)
    kpm[:, 700:] = False
    kpm[:, 5] = False
    mask = r(1, 1, 1024, 1024)
    qd, kd, vd = r(8, 32, 1, 128), r(8, 32, 2048, 128), r(8, 32, 2048, 128)
    qb, kb, vb = r(2, 8, 512, 64), r(2, 8, 512, 64), r(2, 8, 512, 64)
    ob, lse = sdpa(qb, kb, vb, is_causal=True, return_lse=True)
    grad = r(*ob.shape)
    mha = ta.MultiHeadAttention(768, 12, seed=0)
    x = r(8, 128, 768)
    layer = ta.TransformerEncoderLayer(384, 12, 1536, seed=0)
    xe = r(16, 64, 384)
    pad = np.ones((16, 64), bool)
    pad[::2, 40:] = False
    xs = r(2, 1, 16, 64)
    cases: Dict[str, Callable[[], object]] = {
        "sdpa (1,16,1024,1024,64)": lambda: sdpa(q, k, v),
        "  causal": lambda: sdpa(q, k, v, is_causal=True),
        "  window 256": lambda: sdpa(q, k, v, window=256),
        "  key padding": lambda: sdpa(q, k, v, key_padding_mask=kpm),
        "  additive mask": lambda: sdpa(q, k, v, attn_mask=mask),
        "decode (8,32,1,2048,128)": lambda: sdpa(qd, kd, vd),
        "backward causal (2,8,512)": lambda: ta.scaled_dot_product_attention_backward(
            grad, qb, kb, vb, ob, lse, is_causal=True),
        "MHA (8,128,768,12)": lambda: mha(x, x, x),
        "encoder layer, padded": lambda: layer(xe, key_padding_mask=pad),
        "small sdpa (2,1,16,64)": lambda: sdpa(xs, xs, xs),
    }
    print(json.dumps({name: _median_time(fn, 200 if "small" in name else 5)
                      for name, fn in cases.items()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    builds = {"old": args.old, "new": args.new}
    times: Dict[str, List[Dict[str, float]]] = {name: [] for name in builds}
    for i in range(args.rounds):
        order = list(builds) if i % 2 == 0 else list(reversed(builds))
        for name in order:
            env = dict(os.environ, PYTHONPATH=builds[name])
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            times[name].append(json.loads(out))

    def median(name: str, case: str) -> float:
        values = sorted(t[case] for t in times[name])
        return values[len(values) // 2]

    print(f"{'case':28s} {'old ms':>9s} {'new ms':>9s} {'old/new':>8s}"
          f"  (medians of {args.rounds} alternating rounds)")
    for case in times["old"][0]:
        o, n = median("old", case), median("new", case)
        print(f"{case:28s} {o * 1e3:9.3f} {n * 1e3:9.3f} {o / n:8.3f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
        sys.exit(0)
    sys.exit(main())
