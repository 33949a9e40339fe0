"""Forward + backward of the attention core: tileattn vs PyTorch SDPA.

Both take the same float32 inputs and an incoming gradient; tileattn runs
``scaled_dot_product_attention(..., return_lse=True)`` then
``scaled_dot_product_attention_backward``, torch runs
``F.scaled_dot_product_attention`` and ``out.backward(dout)`` on tensors that
require grad. Same thread count for both; contenders alternate in one
process after a warm-up; medians and the median of per-round ratios
torch/tileattn. Also: tileattn's forward and backward alone.

With ``--memory``, each length runs in a fresh process that measures the
peak RSS growth of one backward call beyond its inputs and its outputs
(dq, dk, dv): the kernel's own memory, which must grow like L, not L^2.

    python benchmarks/bench_backward.py [--threads 2] [--rounds 7] [--shapes 1 2]
    python benchmarks/bench_backward.py --memory 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys

import numpy as np

import tileattn
from tileattn import _bench
from tileattn._bench import Shape, median_ratio, paired_times

SHAPES = {
    "1": Shape(4, 12, 512, 512, 64, causal=True),
    "1n": Shape(4, 12, 512, 512, 64),
    "2": Shape(1, 16, 2048, 2048, 64, causal=True),
}


def runners(shape: Shape):
    import torch

    q, k, v = shape.inputs()
    dout = np.random.default_rng(1).standard_normal(q.shape, dtype=np.float32)
    kw = dict(is_causal=shape.causal)

    def tile_fwd():
        return tileattn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)

    out, lse = tile_fwd()

    def tile_bwd():
        return tileattn.scaled_dot_product_attention_backward(dout, q, k, v, out, lse, **kw)

    def tile_both():
        o, l_ = tile_fwd()
        return tileattn.scaled_dot_product_attention_backward(dout, q, k, v, o, l_, **kw)

    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    tdout = torch.from_numpy(dout)

    def torch_both():
        for t in (tq, tk, tv):
            t.grad = None
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)
        o.backward(tdout)
        return tq.grad

    # The two agree (a sanity check, not the test suite's).
    dq = tile_bwd()[0]
    torch_both()
    err = float(np.abs(dq - tq.grad.numpy()).max())
    return {"tileattn": tile_both, "torch": torch_both, "fwd": tile_fwd, "bwd": tile_bwd}, err


def run(keys, threads, rounds):
    import torch

    tileattn.set_num_threads(threads)
    torch.set_num_threads(threads)
    print(f"\n== {threads} thread(s), float32; forward+backward ==")
    print(f"{'shape':5s} {'B,H,Lq,Lk,D':24s} {'tileattn':>10s} {'torch':>10s} "
          f"{'torch/tile':>10s} {'tile fwd':>9s} {'tile bwd':>9s} {'bwd GF/s':>8s} {'|dq diff|':>9s}")
    for key in keys:
        shape = SHAPES[key]
        fns, err = runners(shape)
        times = paired_times(fns, rounds=rounds, warmup=1)
        med = {n: statistics.median(t) for n, t in times.items()}
        # The backward's useful work: 2.5x the forward's two products.
        bwd_gflops = 2.5 * shape.flops() / med["bwd"] / 1e9
        print(f"{key:5s} {shape.label():24s} {med['tileattn']*1e3:8.1f}ms {med['torch']*1e3:8.1f}ms "
              f"{median_ratio(times['torch'], times['tileattn']):9.2f}x "
              f"{med['fwd']*1e3:7.1f}ms {med['bwd']*1e3:7.1f}ms {bwd_gflops:8.1f} {err:9.1e}",
              flush=True)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def memory_child(length: int, heads: int, threads: int) -> None:
    tileattn.set_num_threads(threads)
    rng = np.random.default_rng(0)
    shape = (1, heads, length, 64)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
    out, lse = tileattn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    # Warm the pool's threads and their scratch on a small call first.
    tileattn.scaled_dot_product_attention_backward(
        dout[:, :, :256], q[:, :, :256], k[:, :, :256], v[:, :, :256], out[:, :, :256],
        lse[:, :, :256], is_causal=True)
    before = peak_mb()
    grads = tileattn.scaled_dot_product_attention_backward(dout, q, k, v, out, lse, is_causal=True)
    after = peak_mb()
    outputs = sum(g.nbytes for g in grads) / 2**20
    weights = heads * length * length * 4 / 2**20
    print(f"L={length:6d} H={heads}: peak RSS {before:7.0f} -> {after:7.0f} MB; growth "
          f"{after - before:6.1f} MB = outputs {outputs:6.1f} MB + kernel "
          f"{after - before - outputs:6.1f} MB (the (H, L, L) weights would be {weights:8.0f} MB)",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=["1", "2"])
    ap.add_argument("--memory", type=int, nargs="*", help="sequence lengths for the RSS check")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    _bench.add_lead_in_argument(ap)
    args = ap.parse_args(argv)
    _bench.start(args)
    if args.memory_child:
        memory_child(args.memory_child, args.heads, args.threads[0])
        return 0
    if args.memory is not None:
        for length in args.memory or [4096, 8192, 16384]:
            subprocess.run([sys.executable, __file__, "--memory-child", str(length),
                            "--heads", str(args.heads), "--threads", str(args.threads[0])],
                           check=True)
        return 0
    import torch

    print(f"machine: {platform.machine()} {platform.processor() or ''}; "
          f"tileattn {tileattn.__version__} ({tileattn.config()['isa_path_in_use']}); "
          f"torch {torch.__version__}; numpy {np.__version__}")
    for n in args.threads:
        run(args.shapes, n, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
