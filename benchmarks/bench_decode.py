"""Decoding with a KV cache: one attention step over a long context, and
tokens/second of a small causal decoder stack.

Part 1, one decode step (a new token's queries against `context` cached
positions), for (B, Hq, Hkv, context, D):

- ``tile f32`` / ``tile f16`` / ``tile bf16``: ``KVCache.attend`` on a
  float32 / float16 / bfloat16 cache (appends the new key/value and
  attends; the cache is trimmed back between rounds so the context stays
  fixed). The narrow caches are read in place by the kernel and widened on
  the fly.
- ``f32 bf16p`` / ``bf16 bf16p``: the float32 / bfloat16 cache stepped with
  bf16 products (``compute_dtype="bfloat16"``).
- ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` on the same
  context in float32, with ``enable_gqa=True`` when Hkv < Hq; ``torch exp``:
  on K/V already expanded to Hq heads (the expansion itself not timed). The
  ratios use the faster of the two.

All contenders alternate in one process after a warm-up (2 threads each by
default); medians and the median of per-round ratios.

Part 2, a causal decoder stack (pre-norm blocks of MultiHeadAttention with
RoPE and GQA plus a NumPy GELU MLP, each attention with its own cache):
prefill a prompt, then decode `--tokens` tokens one at a time; tokens/s.

NumPy's BLAS (the projections and the MLP) is limited to one thread unless
OPENBLAS_NUM_THREADS / MKL_NUM_THREADS say otherwise: at batch 1 the GEMMs
are matrix-vector products, and on a shared 2-core machine OpenBLAS's
waiting threads made decoding 4-7x slower with 2 BLAS threads.

    python benchmarks/bench_decode.py [--threads 2] [--rounds 15] [--cases 1 2]
        [--tokens 256] [--no-stack]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # before NumPy loads its BLAS

import argparse  # noqa: E402
import platform
import statistics
from typing import Any, Callable, Dict, List

import numpy as np

import tileattn
from tileattn import _bench
from tileattn._bench import median_ratio, paired_times

CASES = {"1": (8, 32, 8, 4096, 128), "2": (1, 32, 32, 8192, 128)}


def step_runners(case, torch) -> Dict[str, Callable[[], object]]:
    b, hq, hkv, ctx, d = case
    rng = np.random.default_rng(0)
    k = rng.standard_normal((b, hkv, ctx, d), dtype=np.float32)
    v = rng.standard_normal((b, hkv, ctx, d), dtype=np.float32)
    q = rng.standard_normal((b, hq, 1, d), dtype=np.float32)
    kn = rng.standard_normal((b, hkv, 1, d), dtype=np.float32)
    vn = rng.standard_normal((b, hkv, 1, d), dtype=np.float32)
    out = np.empty((b, hq, 1, d), np.float32)
    runners: Dict[str, Callable[[], object]] = {}
    for name, dt, cd in (("tile f32", np.float32, None), ("tile f16", np.float16, None),
                         ("tile bf16", "bfloat16", None),
                         ("f32 bf16p", np.float32, "bfloat16"),
                         ("bf16 bf16p", "bfloat16", "bfloat16")):
        cache = tileattn.KVCache(b, hkv, ctx, d, dtype=dt)
        cache.append(k[:, :, :-1], v[:, :, :-1])

        def run(cache=cache, cd=cd) -> object:
            # context-1 cached + the new token
            cache.attend(q, kn, vn, out=out, compute_dtype=cd)
            cache.trim(1)
            return out

        runners[name] = run
    # torch on the same context: the cached keys plus the new one, float32.
    k[:, :, -1:], v[:, :, -1:] = kn, vn
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    kw = {"enable_gqa": True} if hkv != hq else {}

    def run_torch() -> object:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)

    runners["torch"] = run_torch
    if hkv != hq:
        ek = tk.repeat_interleave(hq // hkv, dim=1).contiguous()
        ev = tv.repeat_interleave(hq // hkv, dim=1).contiguous()

        def run_torch_expanded() -> object:
            with torch.inference_mode():
                return torch.nn.functional.scaled_dot_product_attention(tq, ek, ev)

        runners["torch exp"] = run_torch_expanded
    # Agreement (the fp32 cache against torch, the fp16 one within half rounding).
    want = run_torch().numpy()
    got32 = runners["tile f32"]().copy()
    got16 = runners["tile f16"]().copy()
    print(f"    max|tile f32 - torch| = {np.abs(got32 - want).max():.2e}, "
          f"max|tile f16 - torch| = {np.abs(got16 - want).max():.2e}")
    return runners


def bench_steps(keys: List[str], rounds: int, torch) -> None:
    print(f"{'B,Hq,Hkv,ctx,D':22s} {'tile f32':>10s} {'tile f16':>10s} {'tile bf16':>10s} "
          f"{'f32 bf16p':>10s} {'bf16 bf16p':>10s} "
          f"{'torch':>10s} {'torch exp':>10s} {'f32 x':>7s} {'f16 x':>7s}  KV f32 GB/s")
    for key in keys:
        case = CASES[key]
        print(f"  case {key}: {case}")
        fns = step_runners(case, torch)
        times = paired_times(fns, rounds=rounds, warmup=2)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        best = min((n for n in times if n.startswith("torch")), key=lambda n: med[n])
        r32 = median_ratio(times[best], times["tile f32"])
        r16 = median_ratio(times[best], times["tile f16"])
        b, hq, hkv, ctx, d = case
        gbs = 2 * b * hkv * ctx * d * 4 / (med["tile f32"] / 1e3) / 1e9
        print(f"{','.join(map(str, case)):22s} {med['tile f32']:8.2f}ms {med['tile f16']:8.2f}ms "
              f"{med['tile bf16']:8.2f}ms {med['f32 bf16p']:8.2f}ms {med['bf16 bf16p']:8.2f}ms "
              f"{med['torch']:8.2f}ms "
              f"{(str(round(med['torch exp'], 2)) + 'ms') if 'torch exp' in med else '-':>10s} "
              f"{r32:6.2f}x {r16:6.2f}x  {gbs:.1f}   (ratios vs {best})", flush=True)


# -- a small causal decoder stack -------------------------------------------------
def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x * x * x)))


class Block:
    """Pre-norm decoder block: x + attn(ln1(x)); x + mlp(ln2(x))."""

    def __init__(self, e: int, h: int, hkv: int, rng: np.random.Generator) -> None:
        self.attn = tileattn.MultiHeadAttention(e, h, num_kv_heads=hkv, rope=True,
                                                seed=int(rng.integers(1 << 30)))
        self.ln1, self.ln2 = tileattn.LayerNorm(e), tileattn.LayerNorm(e)
        s = 1.0 / np.sqrt(e)
        self.w1 = (rng.standard_normal((e, 4 * e)) * s).astype(np.float32)
        self.w2 = (rng.standard_normal((4 * e, e)) * s / 2).astype(np.float32)

    def __call__(self, x: np.ndarray, cache: Any) -> np.ndarray:
        x = x + self.attn(self.ln1(x), is_causal=True, cache=cache)
        return x + gelu(self.ln2(x) @ self.w1) @ self.w2


def bench_stack(tokens: int, cache_dtypes=(np.float32, np.float16),
                layers: int = 4, e: int = 512, h: int = 8, hkv: int = 2, batch: int = 1,
                prompt: int = 32, rounds: int = 3) -> None:
    rng = np.random.default_rng(0)
    blocks = [Block(e, h, hkv, rng) for _ in range(layers)]
    emb = (rng.standard_normal((1000, e)) * 0.5).astype(np.float32)
    head = (rng.standard_normal((e, 1000)) / np.sqrt(e)).astype(np.float32)
    d = e // h
    print(f"decoder stack: {layers} layers, E={e}, heads {h}/{hkv} kv, head_dim {d}, "
          f"MLP 4E GELU, batch {batch}, prompt {prompt}, greedy decode of {tokens} tokens")

    def runner(dt) -> Callable[[], object]:
        def run() -> object:
            caches = [tileattn.KVCache(batch, hkv, prompt + tokens, d, dtype=dt) for _ in blocks]
            x = emb[np.random.default_rng(1).integers(0, 1000, (batch, prompt))]
            for blk, c in zip(blocks, caches):       # prefill the prompt
                x = blk(x, c)
            for _ in range(tokens):                  # greedy decoding, one token a step
                nxt = np.argmax(x[:, -1] @ head, axis=-1)
                x = emb[nxt][:, None]
                for blk, c in zip(blocks, caches):
                    x = blk(x, c)
            return x
        return run

    names = {np.dtype(dt).name: runner(dt) for dt in cache_dtypes}
    times = paired_times(names, rounds=rounds, warmup=1)
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  {name} caches: {med * 1e3:.0f} ms for prompt + {tokens} tokens = "
              f"{batch * tokens / med:.0f} tokens/s (median of {len(t)}, prefill included)",
              flush=True)


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--no-stack", action="store_true")
    _bench.add_lead_in_argument(ap)
    args = ap.parse_args(argv)
    _bench.start(args, torch)
    print(f"{platform.machine()}, {args.threads} threads, tileattn {tileattn.__version__} "
          f"({tileattn._core.isa()}), torch {torch.__version__}, numpy {np.__version__}, "
          f"BLAS threads {os.environ.get('OPENBLAS_NUM_THREADS')}")
    bench_steps(args.cases, args.rounds, torch)
    if not args.no_stack:
        for batch in (1, 8):
            bench_stack(args.tokens, batch=batch)


if __name__ == "__main__":
    main()
