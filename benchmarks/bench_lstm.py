"""tileattn.LSTM (NumPy) vs torch.nn.LSTM, inference, same weights.

Paired alternating runs in one process after a warm-up, same threads on each
side. Prints median times, the paired ratio torch/tileattn, the time per step
of the recurrent loop and the share of the up-front input GEMM.

    python benchmarks/bench_lstm.py [--rounds 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import numpy as np

import tileattn
from tileattn._bench import median_ratio, paired_times

# (batch, length, input_size, hidden_size, layers): HybridLSTMAttention's
# defaults on Edifice-sized frames, a larger batch, and a long sequence.
CASES = [(1, 60, 1024, 256, 1), (32, 60, 1024, 256, 1), (8, 60, 1024, 256, 2),
         (8, 500, 64, 128, 1)]


def main(argv: Any = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    tileattn.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, float32, torch {torch.__version__}")
    print(f"{'B,L,In,H,layers':22s} {'tileattn':>10s} {'torch':>10s} {'torch/tile':>10s} "
          f"{'us/step':>8s} {'input GEMM':>10s}")
    for b, length, n_in, h, layers in CASES:
        torch.manual_seed(0)
        tm = torch.nn.LSTM(n_in, h, layers, batch_first=True).eval()
        ours = tileattn.LSTM(n_in, h, layers)
        ours.load_state_dict(tm.state_dict())
        x = np.random.default_rng(0).standard_normal((b, length, n_in), dtype=np.float32)
        tx = torch.from_numpy(x)
        w_ih = ours.weight_ih_l0

        def run_torch() -> object:
            with torch.inference_mode():
                return tm(tx)

        times = paired_times({"tileattn": lambda: ours(x), "torch": run_torch,
                              "gemm": lambda: x.reshape(-1, n_in) @ w_ih.T},
                             rounds=args.rounds, warmup=1)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        step_us = (med["tileattn"] - med["gemm"]) * 1e3 / (length * layers)
        print(f"{f'{b},{length},{n_in},{h},{layers}':22s} {med['tileattn']:8.2f}ms "
              f"{med['torch']:8.2f}ms {median_ratio(times['torch'], times['tileattn']):9.2f}x "
              f"{step_us:8.1f} {100 * med['gemm'] / med['tileattn']:9.0f}%", flush=True)


if __name__ == "__main__":
    main()
