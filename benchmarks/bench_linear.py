"""The projections against their roofline: six ``Linear(4096, 4096)`` layers
(384 MiB of float32 weights, beyond any cache) at decode-sized batches, and
one layer at M = 256 against NumPy's sgemm.

The roofline of the six layers at M rows is max(weight bytes / read
bandwidth, flops / sgemm rate), both measured in the same run: the read
bandwidth is the best of NumPy summing the weights in ``--threads`` Python
threads (each sums its share; NumPy releases the GIL) and PyTorch's
multi-threaded sum if PyTorch is installed; the sgemm rate is NumPy's BLAS
at (256, 4096) x (4096, 4096). Contenders alternate in one process after a
warm-up (``tileattn._bench.paired_times``); medians are reported.

    OPENBLAS_NUM_THREADS=2 python benchmarks/bench_linear.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

import tileattn
from tileattn._bench import paired_times, read_bandwidth

E, LAYERS = 4096, 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tileattn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = [tileattn.Linear(E, E, bias=False, rng=rng) for _ in range(LAYERS)]
    weights = [lin.weight for lin in layers]
    flat = np.concatenate([w.reshape(-1) for w in weights])
    nbytes = flat.nbytes
    bandwidth, readers = read_bandwidth(flat, args.threads, args.rounds)
    del flat
    x256 = rng.standard_normal((256, E), dtype=np.float32)
    big = paired_times({"numpy": lambda: x256 @ weights[0].T,
                        "tileattn": lambda: layers[0](x256)}, rounds=args.rounds)
    sgemm = 2 * 256 * E * E / statistics.median(big["numpy"])
    print(f"{args.threads} threads, ISA path {tileattn._core.isa()}; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s ({', '.join(readers)}), NumPy sgemm "
          f"{sgemm / 1e9:.0f} GFLOP/s")
    print(f"{'rows':>5s} {'tileattn ms':>12s} {'numpy ms':>9s} {'roofline ms':>12s} "
          f"{'share':>6s}  (share = roofline / tileattn; target >= 0.80)")
    for m in (1, 8, 32):
        x = rng.standard_normal((m, E), dtype=np.float32)
        def ours() -> None:
            for lin in layers:
                lin(x)
        def numpy() -> None:
            for w in weights:
                x @ w.T
        t = paired_times({"tileattn": ours, "numpy": numpy}, rounds=args.rounds)
        roof = max(nbytes / bandwidth, LAYERS * 2 * m * E * E / sgemm)
        ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        print(f"{m:5d} {ms['tileattn']:12.1f} {ms['numpy']:9.1f} {roof * 1e3:12.1f} "
              f"{roof * 1e3 / ms['tileattn']:6.2f}")
    ours_rate = 2 * 256 * E * E / statistics.median(big["tileattn"])
    print(f"M = 256, one layer: tileattn {ours_rate / 1e9:.0f} GFLOP/s, NumPy "
          f"{sgemm / 1e9:.0f} GFLOP/s: {ours_rate / sgemm:.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
