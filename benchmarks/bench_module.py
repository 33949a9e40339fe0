"""tileattn.MultiHeadAttention vs torch.nn.MultiheadAttention, forward only.

Same weights, float32, self-attention, 2 threads each, torch under
inference_mode. The contenders alternate in one process after a warm-up;
prints per shape the median times, the median paired ratio torch/tileattn,
and where tileattn's time goes: its two projection GEMMs alone ("proj") and
the attention core alone ("core"), so that "overhead" = forward - proj - core
is what the module adds on top of them.

    python benchmarks/bench_module.py [--rounds 7] [--shapes 1 2 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import numpy as np

import tileattn
from tileattn import _bench
from tileattn._bench import median_ratio, paired_times
from tileattn.linear import affine


@dataclass(frozen=True)
class Case:
    b: int
    l: int
    e: int
    h: int
    causal: bool = False

    def label(self) -> str:
        return f"{self.b},{self.l},{self.e},{self.h}" + (" causal" if self.causal else "")


CASES = {
    "1": Case(8, 128, 768, 12),
    "2": Case(1, 2048, 1024, 16),
    "3": Case(1, 4096, 1024, 16, causal=True),
}


def runners(case: Case, torch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((case.b, case.l, case.e), dtype=np.float32)
    tm = torch.nn.MultiheadAttention(case.e, case.h, batch_first=True).eval()
    mha = tileattn.MultiHeadAttention(case.e, case.h, seed=0)
    mha.load_state_dict(tm.state_dict())
    tx = torch.from_numpy(x)
    kw = {}
    if case.causal:
        # What a torch user writes: the causal mask plus the is_causal hint,
        # which lets torch skip the mask and run its causal SDPA path.
        kw = dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(case.l),
                  is_causal=True)

    def run_torch():
        with torch.inference_mode():
            return tm(tx, tx, tx, need_weights=False, **kw)[0]

    w_in, b_in = mha.projections.in_weight, mha.projections.in_bias
    w_out, b_out = mha.out_proj.weight, mha.out_proj.bias
    x2 = x.reshape(-1, case.e)

    def run_proj():   # the module's two GEMMs (+ biases), nothing else
        y = affine(x2, w_in, b_in)
        return affine(np.ascontiguousarray(y[:, : case.e]), w_out, b_out)

    d = case.e // case.h
    qkv = (x2 @ w_in.T).reshape(case.b, case.l, 3, case.h, d)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    out = np.empty((case.b, case.l, case.h, d), np.float32).transpose(0, 2, 1, 3)

    def run_core():   # the attention kernel alone, on the module's views
        return tileattn.scaled_dot_product_attention(q, k, v, is_causal=case.causal, out=out)

    y_t, y_m = run_torch().numpy(), mha(x, is_causal=case.causal)
    err = float(np.max(np.abs(y_t - y_m)))
    return {"tileattn": lambda: mha(x, is_causal=case.causal), "torch": run_torch,
            "proj": run_proj, "core": run_core}, err


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=list(CASES))
    ap.add_argument("--threads", type=int, default=2)
    _bench.add_lead_in_argument(ap)
    args = ap.parse_args(argv)
    _bench.start(args, torch)
    print(f"{args.threads} threads, float32, torch {torch.__version__}, "
          f"tileattn {tileattn.__version__}")
    print(f"{'B,L,E,H':22s} {'tileattn':>10s} {'torch':>10s} {'torch/tile':>10s} "
          f"{'proj':>9s} {'core':>9s} {'overhead':>9s} {'max|diff|':>9s}")
    for key in args.shapes:
        case = CASES[key]
        fns, err = runners(case, torch)
        times = paired_times(fns, rounds=args.rounds, warmup=1)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        overhead = med["tileattn"] - med["proj"] - med["core"]
        print(f"{case.label():22s} {med['tileattn']:8.2f}ms {med['torch']:8.2f}ms "
              f"{median_ratio(times['torch'], times['tileattn']):9.2f}x "
              f"{med['proj']:7.2f}ms {med['core']:7.2f}ms {overhead:7.2f}ms {err:9.2e}",
              flush=True)


if __name__ == "__main__":
    main()
