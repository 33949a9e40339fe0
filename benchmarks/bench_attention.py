"""tileattn vs PyTorch SDPA vs NumPy on the performance issue's shapes.

Runs the contenders on the same inputs in one process, alternating after a
warm-up, and prints per shape: median times, GFLOP/s (4*B*Hq*pairs*D over the
pairs the mask lets through), the paired median ratio torch/tileattn and, as
the practical ceiling, the GFLOP/s of a float32 NumPy matmul in the same run
(in a subprocess whose BLAS has the run's thread count).

The plain-NumPy contender runs with one BLAS thread (OPENBLAS_NUM_THREADS=1
unless set): an OpenBLAS pool keeps its threads spinning for ~130 ms after a
call, taking a core from whichever contender runs next.

    python benchmarks/bench_attention.py [--threads 1 2] [--rounds 7] [--numpy]
        [--shapes 1 2 3] [--float64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads its BLAS

import numpy as np  # noqa: E402

import tileattn  # noqa: E402
from tileattn import _bench  # noqa: E402
from tileattn._bench import (Shape, matmul_gflops, median_ratio, numpy_attention,  # noqa: E402
                             paired_times, tileattn_runner, torch_runner)

SHAPES = {
    "1": Shape(8, 12, 128, 128, 64),
    "2": Shape(1, 16, 1024, 1024, 64),
    "3": Shape(1, 16, 2048, 2048, 64),
    "3c": Shape(1, 16, 2048, 2048, 64, causal=True),
    "4": Shape(1, 8, 8192, 8192, 64, causal=True),
    "5": Shape(1, 32, 4096, 4096, 128, hkv=8, causal=True),
    "6": Shape(1, 8, 16384, 16384, 64, window=512),
    "7": Shape(8, 32, 1, 4096, 128),
}


def run(shape_keys, threads, rounds, with_numpy, with_f64):
    import torch

    tileattn.set_num_threads(threads)
    torch.set_num_threads(threads)
    ceiling = matmul_gflops(threads=threads)
    print(f"\n== {threads} thread(s); float32 NumPy matmul ceiling {ceiling:.1f} GFLOP/s ==")
    print(f"{'shape':5s} {'B,Hq,Lq,Lk,D':30s} {'tileattn':>18s} {'torch':>18s} "
          f"{'torch/tile':>10s} {'%matmul':>8s}" + (f" {'numpy':>18s}" if with_numpy else "")
          + (f" {'f64/f32':>8s}" if with_f64 else ""))
    for key in shape_keys:
        shape = SHAPES[key]
        q, k, v = shape.inputs()
        runners = {"tileattn": tileattn_runner(shape, q, k, v),
                   "torch": torch_runner(shape, q, k, v)}
        if with_numpy and shape.lq * shape.lk * shape.hq * shape.b <= 2**28:
            runners["numpy"] = lambda: numpy_attention(q, k, v, shape.causal, shape.window)
        if with_f64:
            q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
            runners["f64"] = tileattn_runner(shape, q64, k64, v64)
        times = paired_times(runners, rounds=rounds, warmup=1)
        med = {n: statistics.median(t) for n, t in times.items()}
        gf = {n: shape.flops() / t / 1e9 for n, t in med.items()}
        line = (f"{key:5s} {shape.label():30s} {med['tileattn']*1e3:8.2f}ms {gf['tileattn']:6.1f}GF "
                f"{med['torch']*1e3:8.2f}ms {gf['torch']:6.1f}GF "
                f"{median_ratio(times['torch'], times['tileattn']):9.2f}x "
                f"{100 * gf['tileattn'] / ceiling:7.0f}%")
        if with_numpy:
            line += (f" {med['numpy']*1e3:8.2f}ms {gf['numpy']:6.1f}GF" if "numpy" in med
                     else f" {'(too big)':>18s}")
        if with_f64:
            line += f" {median_ratio(times['f64'], times['tileattn']):7.2f}x"
        print(line, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--numpy", action="store_true", help="also time plain NumPy attention")
    ap.add_argument("--float64", action="store_true", help="also time tileattn in float64")
    _bench.add_lead_in_argument(ap)
    args = ap.parse_args(argv)
    _bench.start(args)
    import torch

    print(f"machine: {platform.machine()} {platform.processor() or ''}; "
          f"tileattn {tileattn.__version__} ({tileattn.config()['isa_path_in_use']}); "
          f"torch {torch.__version__}; numpy {np.__version__}")
    for n in args.threads:
        run(args.shapes, n, args.rounds, args.numpy, args.float64)
    return 0


if __name__ == "__main__":
    sys.exit(main())
