"""``python -m tileattn``: what this build is, and how fast it is here.

``python -m tileattn`` prints the configuration (version, threads, CPU
features, kernel path), then a short table of tileattn against plain NumPy
attention and, when torch is installed, PyTorch's
scaled_dot_product_attention, timed alternately in this process. It takes
well under a minute.

``python -m tileattn bench [--quick] [--threads N] [--plot FILE.png]`` runs
the benchmark shapes of the performance work (``--quick``: a short subset),
and with ``--plot`` draws GFLOP/s against sequence length for tileattn,
PyTorch and NumPy (needs matplotlib).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, TextIO

from ._bench import Shape, numpy_attention, paired_times, tileattn_runner, torch_runner
from ._config import show_config
from ._progress import progress
from ._threads import get_num_threads, set_num_threads

QUICK_SHAPES = [
    Shape(8, 12, 128, 128, 64),
    Shape(1, 16, 1024, 1024, 64),
    Shape(1, 16, 1024, 1024, 64, causal=True),
    Shape(1, 8, 4096, 4096, 64, window=256),
    Shape(8, 32, 1, 2048, 128, hkv=8),
]

# The performance issue's shapes (B, Hq, Lq, Lk, D).
FULL_SHAPES = [
    Shape(8, 12, 128, 128, 64),
    Shape(1, 16, 1024, 1024, 64),
    Shape(1, 16, 2048, 2048, 64),
    Shape(1, 16, 2048, 2048, 64, causal=True),
    Shape(1, 8, 8192, 8192, 64, causal=True),
    Shape(1, 32, 4096, 4096, 128, hkv=8, causal=True),
    Shape(1, 8, 16384, 16384, 64, window=512),
    Shape(8, 32, 1, 4096, 128),
]

PLOT_LENGTHS = [128, 256, 512, 1024, 2048, 4096]
NUMPY_MAX_SCORES = 2**27  # skip NumPy where its dense scores would pass 512 MB


def _torch_available() -> bool:
    try:
        import torch

        torch.set_num_threads(get_num_threads())
        return True
    except ImportError:
        return False


def _runners(shape: Shape, with_torch: bool, with_numpy: bool) -> Dict[str, Callable[[], object]]:
    q, k, v = shape.inputs()
    runners: Dict[str, Callable[[], object]] = {"tileattn": tileattn_runner(shape, q, k, v)}
    if with_numpy and shape.b * shape.hq * shape.lq * shape.lk <= NUMPY_MAX_SCORES:
        runners["numpy"] = lambda: numpy_attention(q, k, v, shape.causal, shape.window)
    t_runner = torch_runner(shape, q, k, v) if with_torch else None
    if t_runner is not None:
        runners["torch"] = t_runner
    return runners


def measure(shape: Shape, rounds: int, with_torch: bool, with_numpy: bool = True,
            budget_s: float = 4.0) -> Dict[str, List[float]]:
    """Alternating timings (seconds) of each contender on one shape."""
    return paired_times(_runners(shape, with_torch, with_numpy), rounds=rounds,
                        budget_s=budget_s)


def _cell(times: Dict[str, List[float]], name: str, flops: float) -> str:
    if name not in times:
        return f"{'-':>22s}"
    t = statistics.median(times[name])
    return f"{t * 1e3:9.2f} ms {flops / t / 1e9:7.1f}".rjust(22)


def bench_table(shapes: Sequence[Shape], rounds: int, out: TextIO = sys.stdout,
                show_progress: bool = False) -> None:
    """Prints one row per shape: median ms and GFLOP/s of each contender and
    the median paired ratio torch/tileattn."""
    have_torch = _torch_available()
    head = f"{'B,Hq,Lq,Lk,D':28s} {'tileattn ms  GFLOP/s':>22s} {'numpy ms  GFLOP/s':>22s}"
    if have_torch:
        head += f" {'torch ms  GFLOP/s':>22s} {'torch/tileattn':>15s}"
    print(head, file=out)
    for shape in progress(shapes, enabled=show_progress, desc="shapes"):
        times = measure(shape, rounds, have_torch)
        line = f"{shape.label():28s} {_cell(times, 'tileattn', shape.flops())}"
        line += f" {_cell(times, 'numpy', shape.flops())}"
        if "torch" in times:
            ratio = statistics.median(a / b for a, b in zip(times["torch"], times["tileattn"]))
            line += f" {_cell(times, 'torch', shape.flops())} {ratio:14.2f}x"
        print(line, file=out, flush=True)


def plot_lengths(path: str, rounds: int, lengths: Iterable[int] = PLOT_LENGTHS,
                 show_progress: bool = True) -> None:
    """GFLOP/s against sequence length (B=1, H=8, D=64, causal) to a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'tileattn[plot]'") from None
    have_torch = _torch_available()
    series: Dict[str, Dict[int, float]] = {"tileattn": {}, "torch": {}, "numpy": {}}
    for n in progress(list(lengths), enabled=show_progress, desc="lengths"):
        shape = Shape(1, 8, n, n, 64, causal=True)
        for name, t in measure(shape, rounds, have_torch).items():
            series[name][n] = shape.flops() / statistics.median(t) / 1e9
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in series.items():
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (B=1, H=8, D=64, causal, float32)")
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"attention forward, {get_num_threads()} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _main_job(rounds: int) -> int:
    show_config()
    print()
    print(f"fp32 attention, {get_num_threads()} threads, median of alternating runs "
          "(GFLOP/s count 4*B*Hq*Lq*Lk*D over the visible pairs):")
    bench_table(QUICK_SHAPES, rounds=rounds)
    return 0


def _bench(args: argparse.Namespace) -> int:
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    rounds = min(args.rounds, 3) if args.quick else args.rounds
    print(f"tileattn bench: {len(shapes)} shapes, {get_num_threads()} threads, "
          f"{rounds} alternating rounds")
    bench_table(shapes, rounds=rounds, show_progress=not args.quick)
    if args.plot:
        plot_lengths(args.plot, rounds=rounds, lengths=PLOT_LENGTHS[:4] if args.quick
                     else PLOT_LENGTHS)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tileattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="threads to use")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per shape")
    sub = parser.add_subparsers(dest="command")
    bench = sub.add_parser("bench", help="the benchmark table (and plot)")
    bench.add_argument("--quick", action="store_true", help="a short subset of the shapes")
    bench.add_argument("--threads", type=int, default=None, help="threads to use")
    bench.add_argument("--rounds", type=int, default=7, help="timed rounds per shape")
    bench.add_argument("--plot", metavar="FILE.png", help="also plot GFLOP/s vs length")
    args = parser.parse_args(argv)
    if args.threads is not None:
        set_num_threads(args.threads)
    if args.command == "bench":
        return _bench(args)
    return _main_job(args.rounds)


if __name__ == "__main__":
    sys.exit(main())
