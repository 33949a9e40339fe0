"""Decode steps of causal decoder stacks: tileattn against its roofline and
against PyTorch eager, in one process.

Two stacks (pre-norm blocks: LayerNorm, attention over a KV cache, LayerNorm,
MLP, residual adds; no positional encoding on either side):
  gpt2-small: 12 layers, E=768, 12 heads, GELU MLP 3072, biases;
  1b-class:   16 layers, E=2048, 16 heads with 8 KV heads, SwiGLU MLP 8192,
              no biases (1.0e9 parameters, 4 GiB of float32 weights).
At batch 1 and 8 and a context of 1024 and 4096 positions: float32 weights
with float32 and float16 caches, and (``--weights bf16``) bf16 weights
(``compute_dtype="bfloat16"``: every projection streams its weight packed in
bf16, half the bytes, and attention runs bf16 products) with float32 and
bfloat16 caches. The caches are filled with random keys and
values (a timed prefill of the large stack would take minutes); each timed
step decodes one token per sequence, and the caches are rolled back after
each round so every step sees the same context.

Reported per case: ms per step, tokens/s (batch / step time), the bytes a
step must read (weights + the cache's keys and values) over its time, and
the roofline: those bytes over the read bandwidth measured in the same run
(the best of NumPy summing a 1 GiB array in `--threads` Python threads and
PyTorch's sum). The peer (float32 caches): ``nn.Linear``, ``nn.LayerNorm``
and ``F.scaled_dot_product_attention`` (``enable_gqa``) over preallocated
cache tensors that share tileattn's cache storage and weights (no copies;
the two write the same new position in turn), under ``inference_mode``, the
same threads. Per (stack, weights, batch, context) the cache dtypes and
the peer alternate in one paired run after a warm-up (``paired_times``);
speed is the median of per-round ratios.

    python benchmarks/bench_decoder_stack.py [--shapes gpt2-small,1b-class]
        [--batches 1,8] [--contexts 1024,4096] [--weights f32,bf16] [--rounds 5]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np

import tileattn
from tileattn._bench import paired_times, read_bandwidth
from tileattn.activations import activation_


@dataclass(frozen=True)
class Stack:
    layers: int
    e: int
    heads: int
    kv_heads: int
    mlp: int
    swiglu: bool

    @property
    def head_dim(self) -> int:
        return self.e // self.heads


SHAPES = {"gpt2-small": Stack(12, 768, 12, 12, 3072, False),
          "1b-class": Stack(16, 2048, 16, 8, 8192, True)}
STEPS = 3      # timed steps per round


class Block:
    """One pre-norm decoder block of tileattn modules."""

    def __init__(self, s: Stack, rng: np.random.Generator,
                 compute_dtype: Optional[str] = None) -> None:
        bias = not s.swiglu
        self.s = s
        self.norm1 = tileattn.LayerNorm(s.e, bias=bias)
        self.attn = tileattn.MultiHeadAttention(s.e, s.heads, num_kv_heads=s.kv_heads,
                                                bias=bias, seed=int(rng.integers(1 << 31)),
                                                compute_dtype=compute_dtype)
        self.norm2 = tileattn.LayerNorm(s.e, bias=bias)
        up = 2 * s.mlp if s.swiglu else s.mlp      # SwiGLU: gate and up in one matrix
        self.up = tileattn.Linear(s.e, up, bias=bias, rng=rng, compute_dtype=compute_dtype)
        self.down = tileattn.Linear(s.mlp, s.e, bias=bias, rng=rng, compute_dtype=compute_dtype)

    def streamed_bytes(self) -> int:
        """The parameter bytes a step reads: bf16 weights are streamed
        packed in bf16 (half their float32 bytes)."""
        total = 0
        for m in (self.norm1, self.attn, self.norm2, self.up, self.down):
            for name, p in m.named_parameters():
                half = name.endswith("weight") and getattr(m, "bf16", False) and p.ndim == 2
                total += p.nbytes // 2 if half else p.nbytes
        return total

    def step(self, x: np.ndarray, cache: tileattn.KVCache) -> np.ndarray:
        h = x + self.attn(self.norm1(x), is_causal=True, cache=cache)
        a = self.up(self.norm2(h))
        if self.s.swiglu:
            gate = activation_("silu", np.ascontiguousarray(a[..., :self.s.mlp]))
            gate *= a[..., self.s.mlp:]
            a = gate
        else:
            activation_("gelu_tanh", a)
        out: np.ndarray = h + self.down(a)
        return out


def torch_block(block: Block, torch: Any) -> Any:
    """The same block in PyTorch eager, sharing the weights' memory."""
    nn, F = torch.nn, torch.nn.functional
    s = block.s

    def linear(lin: tileattn.Linear) -> Any:
        t = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        t.weight = nn.Parameter(torch.from_numpy(lin.weight), requires_grad=False)
        if lin.bias is not None:
            t.bias = nn.Parameter(torch.from_numpy(lin.bias), requires_grad=False)
        return t

    def norm(n: tileattn.LayerNorm) -> Any:
        t = nn.LayerNorm(s.e, bias=n.bias is not None)
        t.weight = nn.Parameter(torch.from_numpy(n.weight), requires_grad=False)
        if n.bias is not None:
            t.bias = nn.Parameter(torch.from_numpy(n.bias), requires_grad=False)
        return t

    a = block.attn
    q, k, v, o = (linear(getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "out_proj"))
    n1, n2, up, down = norm(block.norm1), norm(block.norm2), linear(block.up), linear(block.down)
    d = s.head_dim

    def step(x: Any, kc: Any, vc: Any, pos: int) -> Any:
        b = x.shape[0]
        y = n1(x)
        qh = q(y).view(b, 1, s.heads, d).transpose(1, 2)
        kc[:, :, pos] = k(y).view(b, s.kv_heads, d)
        vc[:, :, pos] = v(y).view(b, s.kv_heads, d)
        att = F.scaled_dot_product_attention(qh, kc[:, :, :pos + 1], vc[:, :, :pos + 1],
                                             enable_gqa=s.kv_heads != s.heads)
        h = x + o(att.transpose(1, 2).reshape(b, 1, s.e))
        u = up(n2(h))
        if s.swiglu:
            u = F.silu(u[..., :s.mlp]) * u[..., s.mlp:]
        else:
            u = F.gelu(u, approximate="tanh")
        return h + down(u)
    return step


def fill(cache: tileattn.KVCache, ctx: int, rng: np.random.Generator) -> None:
    """ctx random positions in every sequence (a random block tiled: values
    do not matter for the time, generating 4 GiB of them would)."""
    b, h, d = cache.batch, cache.num_kv_heads, cache.head_dim
    block = rng.standard_normal(1 << 20).astype(np.float32)
    kv = np.resize(block, (b, h, ctx, d))
    cache.append(kv, kv)


def decode_steps(blocks: List[Block], caches: List[tileattn.KVCache],
                 x: np.ndarray) -> np.ndarray:
    """STEPS decode steps of x through the stack, the caches rolled back
    after them (every round sees the same context); the last step's output."""
    h = x
    for _ in range(STEPS):
        h = x
        for blk, c in zip(blocks, caches):
            h = blk.step(h, c)
    for c in caches:
        c.trim(STEPS)
    return h


def run_case(name: str, s: Stack, blocks: List[Block], steps: List[Any], batch: int, ctx: int,
             cache_dtypes: Any, bandwidth: float, rounds: int, torch: Any, weights: str) -> None:
    """One (stack, weights, batch, context): tileattn over a cache of each
    dtype and the peer over the float32 one, alternating in one paired run
    (timing the cache dtypes in separate runs had the later one pay for
    whatever the machine did meanwhile)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, 1, s.e)).astype(np.float32)
    runners: Dict[str, Callable[[], object]] = {}
    cache_sets: Dict[str, List[tileattn.KVCache]] = {}
    for dt in cache_dtypes:
        caches = [tileattn.KVCache(batch, s.kv_heads, ctx + STEPS + 1, s.head_dim, dtype=dt)
                  for _ in blocks]
        for c in caches:
            fill(c, ctx, rng)
        key = np.dtype(dt).name
        cache_sets[key] = caches

        runners[key] = functools.partial(decode_steps, blocks, caches, x)
    if torch is not None and "float32" in cache_sets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # the read-only weights: torch only reads them
            kvs = [(torch.from_numpy(c.k), torch.from_numpy(c.v)) for c in cache_sets["float32"]]
        xt = torch.from_numpy(x)

        def peer() -> None:
            with torch.inference_mode():
                for i in range(STEPS):
                    h = xt
                    for st, (kc, vc) in zip(steps, kvs):
                        h = st(h, kc, vc, ctx + i)
        runners["torch"] = peer
    t = paired_times(runners, rounds=rounds)
    ms = {k: statistics.median(v) / STEPS * 1e3 for k, v in t.items()}
    weight_bytes = sum(blk.streamed_bytes() for blk in blocks)
    for key, caches in cache_sets.items():
        cache_bytes = sum(c.k[:, :, :ctx].nbytes + c.v[:, :, :ctx].nbytes for c in caches)
        step_bytes = weight_bytes + cache_bytes
        roof = step_bytes / bandwidth
        line = (f"{name:11s} {weights:4s} {batch:3d} {ctx:5d} {key:8s} "
                f"{ms[key]:8.1f} {batch / ms[key] * 1e3:8.1f} "
                f"{step_bytes / ms[key] / 1e6:6.1f} {roof * 1e3:8.1f} "
                f"{roof * 1e3 / ms[key]:6.2f}")
        if key == "float32" and "torch" in ms:
            ratio = statistics.median(a / b for a, b in zip(t["torch"], t[key]))
            line += f" {ms['torch']:8.1f} {ratio:6.2f}x"
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="gpt2-small,1b-class")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--weights", default="f32",
                    help="f32 (float32 weights), bf16 (bf16 weights and products) or both")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    tileattn.set_num_threads(args.threads)
    torch: Optional[Any] = None
    if not args.no_torch:
        try:
            import torch as torch_module
            torch = torch_module
            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    bandwidth, _ = read_bandwidth(np.ones(1 << 28, np.float32), args.threads, args.rounds)
    print(f"{args.threads} threads, ISA path {tileattn._core.isa()}, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; torch {torch.__version__ if torch else 'absent'}")
    print(f"{'stack':11s} {'wts':4s} {'B':>3s} {'ctx':>5s} {'cache':8s} {'ms/step':>8s} "
          f"{'tok/s':>8s} "
          f"{'GB/s':>6s} {'roof ms':>8s} {'share':>6s} {'torch ms':>8s} {'speed':>7s}")
    for name in args.shapes.split(","):
        s = SHAPES[name]
        for weights in args.weights.split(","):
            bf16 = weights == "bf16"
            rng = np.random.default_rng(0)
            blocks = [Block(s, rng, "bfloat16" if bf16 else None) for _ in range(s.layers)]
            # The peer only with float32 weights (the comparison).
            steps = [torch_block(b, torch) for b in blocks] if torch and not bf16 else []
            caches = (np.float32, "bfloat16") if bf16 else (np.float32, np.float16)
            for batch in (int(v) for v in args.batches.split(",")):
                for ctx in (int(v) for v in args.contexts.split(",")):
                    run_case(name, s, blocks, steps, batch, ctx, caches, bandwidth,
                             args.rounds, torch if steps else None, weights)
            del blocks, steps


if __name__ == "__main__":
    main()
