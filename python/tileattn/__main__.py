"""``python -m tileattn``: what this build is, and how fast it is here.

Prints the configuration (version, threads, CPU features, kernel path), then
a short table of tileattn against plain NumPy attention and, when torch is
installed, PyTorch's scaled_dot_product_attention, timed alternately in this
process. Takes well under a minute.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from ._bench import Shape, numpy_attention, paired_times, tileattn_runner, torch_runner
from ._config import show_config
from ._threads import get_num_threads, set_num_threads

QUICK_SHAPES = [
    Shape(8, 12, 128, 128, 64),
    Shape(1, 16, 1024, 1024, 64),
    Shape(1, 16, 1024, 1024, 64, causal=True),
    Shape(1, 8, 4096, 4096, 64, window=256),
    Shape(8, 32, 1, 2048, 128, hkv=8),
]


def _fmt(seconds: float, flops: float) -> str:
    return f"{seconds * 1e3:9.2f} ms {flops / seconds / 1e9:7.1f}"


def bench_table(shapes, rounds: int, out=sys.stdout) -> None:
    try:
        import torch

        torch.set_num_threads(get_num_threads())
        have_torch = True
    except ImportError:
        have_torch = False
    head = f"{'B,Hq,Lq,Lk,D':28s} {'tileattn ms  GFLOP/s':>22s} {'numpy ms  GFLOP/s':>22s}"
    if have_torch:
        head += f" {'torch ms  GFLOP/s':>22s} {'torch/tileattn':>15s}"
    print(head, file=out)
    for shape in shapes:
        q, k, v = shape.inputs()
        runners = {"tileattn": tileattn_runner(shape, q, k, v)}
        runners["numpy"] = lambda: numpy_attention(q, k, v, shape.causal, shape.window)
        t_runner = torch_runner(shape, q, k, v) if have_torch else None
        if t_runner is not None:
            runners["torch"] = t_runner
        times = paired_times(runners, rounds=rounds, budget_s=4.0)
        med = {n: statistics.median(t) for n, t in times.items()}
        line = f"{shape.label():28s} {_fmt(med['tileattn'], shape.flops()):>22s}"
        line += f" {_fmt(med['numpy'], shape.flops()):>22s}"
        if "torch" in med:
            ratio = statistics.median(a / b for a, b in zip(times["torch"], times["tileattn"]))
            line += f" {_fmt(med['torch'], shape.flops()):>22s} {ratio:14.2f}x"
        print(line, file=out, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tileattn", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="threads to use")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per shape")
    args = parser.parse_args(argv)
    if args.threads is not None:
        set_num_threads(args.threads)
    show_config()
    print()
    print(f"fp32 attention, {get_num_threads()} threads, median of alternating runs "
          "(GFLOP/s count 4*B*Hq*Lq*Lk*D over the visible pairs):")
    bench_table(QUICK_SHAPES, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
