"""Memory of an inference stack before and after ``Module.freeze()``, and
its decode step paired against the same stack unfrozen.

The stacks are ``bench_decoder_stack.py``'s (pre-norm decoder blocks of
tileattn modules). Unfrozen, each projection holds its weight twice: the
row-major float32 parameter and the packed copy the GEMM streams (float32,
or bf16 with ``compute_dtype="bfloat16"``). Frozen, only the packed copy.

Per stack and weight type: the bytes the modules hold by their own count
(``Module.nbytes``) and the process's resident set growth (from
/proc/self/statm, less the caches) after building the stack and running one
step (so every packed copy exists), and again after freezing it; then the
step time of the frozen stack and of an unfrozen twin built from the same
seed, alternating (``paired_times``), whose outputs must be bitwise equal.

    python benchmarks/bench_frozen.py [--shapes gpt2-small,1b-class]
        [--weights f32,bf16] [--batch 1] [--context 1024] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
from typing import Any, List

import numpy as np

import tileattn
from tileattn._bench import paired_times
from bench_decoder_stack import SHAPES, STEPS, Block, Stack, decode_steps, fill

_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def modules_of(blocks: List[Block]) -> List[tileattn.Module]:
    return [m for b in blocks for m in (b.norm1, b.attn, b.norm2, b.up, b.down)]


def held_bytes(blocks: List[Block]) -> int:
    """What the modules hold by their own count (``Module.nbytes``)."""
    return sum(m.nbytes for m in modules_of(blocks))


def build(s: Stack, bf16: bool) -> List[Block]:
    rng = np.random.default_rng(0)
    return [Block(s, rng, "bfloat16" if bf16 else None) for _ in range(s.layers)]


def run(name: str, s: Stack, weights: str, batch: int, ctx: int, rounds: int) -> None:
    bf16 = weights == "bf16"
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 1, s.e)).astype(np.float32)

    def caches() -> List[tileattn.KVCache]:
        cs = [tileattn.KVCache(batch, s.kv_heads, ctx + STEPS + 1, s.head_dim)
              for _ in range(s.layers)]
        for c in cs:
            fill(c, ctx, np.random.default_rng(2))
        return cs

    def stepper(blocks: List[Block], cs: List[tileattn.KVCache]) -> Any:
        return functools.partial(decode_steps, blocks, cs, x)

    gc.collect()
    tileattn._core.release_free_memory()     # what earlier cases freed: not this one's
    base = resident_bytes()
    frozen = build(s, bf16)
    frozen_caches = caches()
    cache_bytes = sum(c.k.nbytes + c.v.nbytes for c in frozen_caches)
    step_frozen = stepper(frozen, frozen_caches)
    want = step_frozen()             # every packed copy made
    held_before = held_bytes(frozen)
    rss_before = resident_bytes() - base - cache_bytes
    for m in modules_of(frozen):
        m.freeze()
    gc.collect()
    rss_after = resident_bytes() - base - cache_bytes
    held_after = held_bytes(frozen)
    got = step_frozen()
    assert np.array_equal(got, want), "freezing changed the outputs"
    twin = build(s, bf16)
    step_twin = stepper(twin, caches())
    assert np.array_equal(step_twin(), want)
    t = paired_times({"frozen": step_frozen, "unfrozen": step_twin}, rounds=rounds)
    ms = {k: statistics.median(v) / STEPS * 1e3 for k, v in t.items()}
    ratio = statistics.median(a / b for a, b in zip(t["frozen"], t["unfrozen"]))
    print(f"{name:11s} {weights:4s} {held_before / 2**20:9.0f} {held_after / 2**20:9.0f} "
          f"{held_after / held_before:6.2f} {rss_before / 2**20:9.0f} "
          f"{rss_after / 2**20:9.0f} {ms['frozen']:8.2f} {ms['unfrozen']:8.2f} {ratio:6.3f}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="gpt2-small")
    ap.add_argument("--weights", default="f32,bf16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    tileattn.set_num_threads(args.threads)
    print(f"{args.threads} threads, ISA path {tileattn._core.isa()}, batch {args.batch}, "
          f"context {args.context}, float32 caches")
    print(f"{'stack':11s} {'wts':4s} {'held MiB':>9s} {'frozen':>9s} {'ratio':>6s} "
          f"{'RSS MiB':>9s} {'frozen':>9s} {'ms fz':>8s} {'ms unfz':>8s} {'fz/un':>6s}")
    for name in args.shapes.split(","):
        for weights in args.weights.split(","):
            run(name, SHAPES[name], weights, args.batch, args.context, args.rounds)


if __name__ == "__main__":
    main()
