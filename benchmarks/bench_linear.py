"""The projections against their roofline: six ``Linear(4096, 4096)`` layers
(384 MiB of float32 weights, beyond any cache) at decode-sized batches, and
one layer at M = 256 against NumPy's sgemm; then the same layers with
bf16 products (``compute_dtype="bfloat16"``: the weights packed in bf16,
half the bytes) against the float32 ones.

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
    bf16_against_float32(layers, rng, args.rounds, bandwidth)


def bf16_against_float32(layers: list, rng: np.random.Generator, rounds: int,
                         bandwidth: float) -> None:
    """The same layers with bf16 products, paired with the float32 ones."""
    bf16 = []
    for lin in layers:
        b = tileattn.Linear(E, E, bias=False, compute_dtype="bfloat16")
        b.load_state_dict(lin.state_dict())
        bf16.append(b)
    nbytes = sum(b.packed_weight().nbytes for b in bf16)
    print(f"bf16 products on the {tileattn._core.isa()} path "
          f"({tileattn.config()['bf16_products']}); packed bf16 weights {nbytes / 2**20:.0f} MiB")
    print(f"{'rows':>5s} {'layers':>6s} {'float32 ms':>11s} {'bf16 ms':>8s} {'bf16/f32':>9s} "
          f"{'bf16 bytes / bandwidth':>23s}  (target at M = 1: bf16/f32 <= 0.60)")
    for m, count in ((1, LAYERS), (8, LAYERS), (32, LAYERS), (256, 1)):
        x = rng.standard_normal((m, E), dtype=np.float32)
        def run(mods: list) -> None:
            for lin in mods[:count]:
                lin(x)
        t = paired_times({"f32": lambda: run(layers), "bf16": lambda: run(bf16)}, rounds=rounds)
        ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        roof = nbytes * count / LAYERS / bandwidth * 1e3
        print(f"{m:5d} {count:6d} {ms['f32']:11.1f} {ms['bf16']:8.1f} "
              f"{ms['bf16'] / ms['f32']:9.2f} {roof:20.1f} ms")


if __name__ == "__main__":
    main()
