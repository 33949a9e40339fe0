"""Peak RSS growth of one attention call beyond its inputs and output.

Runs in a fresh process: allocates and touches q, k, v and the output,
records the peak resident set size, runs tileattn once, and reports by how
much the peak grew (the kernel's own memory: thread scratch, tiles).

    python benchmarks/peak_memory.py [B Hq Lq Lk D] [--causal] [--threads N]
"""

import argparse
import resource
import sys

import numpy as np

import tileattn


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[1, 8, 8192, 8192, 64])
    ap.add_argument("--causal", action="store_true", default=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    b, hq, lq, lk, d = args.shape
    tileattn.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((b, hq, lq, d), dtype=np.float32)
    k = rng.standard_normal((b, hq, lk, d), dtype=np.float32)
    v = rng.standard_normal((b, hq, lk, d), dtype=np.float32)
    out = np.ones_like(q)  # touched, so it counts before the call
    # warm the thread pool on a tiny call so its threads' stacks count too
    tileattn.scaled_dot_product_attention(q[:, :, :8], k[:, :, :8], v[:, :, :8])
    before = peak_mb()
    tileattn.scaled_dot_product_attention(q, k, v, is_causal=args.causal, out=out)
    after = peak_mb()
    inputs = (q.nbytes + k.nbytes + v.nbytes + out.nbytes) / 2**20
    print(f"shape {args.shape} causal={args.causal} threads={args.threads}: inputs+output "
          f"{inputs:.0f} MB; peak RSS {before:.0f} -> {after:.0f} MB, growth {after - before:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
