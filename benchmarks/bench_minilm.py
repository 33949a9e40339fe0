"""Sentences per second: all-MiniLM-L6-v2 on tileattn (examples/sentence_embeddings.py)
vs the same model in PyTorch (transformers' BertModel + mean pooling + L2 norm).

Batches of 32 sentences of 20-128 tokens (real text, lengths drawn uniformly),
padded to the batch's longest; both sides get the same token ids and compute
from ids to normalised embeddings (tokenising is the same library for both and
is timed separately). Same threads on each side, torch under inference_mode;
the contenders alternate in one process after a warm-up and are compared by
medians and by the median of per-round ratios.

    python benchmarks/bench_minilm.py [--rounds 7] [--batches 4] [--threads 2] [--profile]

--profile prints where tileattn's time goes in one batch (GEMMs, attention
core, LayerNorm, GELU, the rest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

import tileattn
from tileattn._bench import median_ratio, paired_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sentence_embeddings as se  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her an were are which "
         "this be or has had not but also its their one new first after two time who more "
         "attention kernel memory threads block query key value softmax matrix window cache "
         "language model sentence vector token embedding layer network train data result "
         "people city river music history school water between during under several known "
         "university government company national international village season album film").split()


def sentences(model: se.MiniLM, n: int, rng: np.random.Generator) -> List[str]:
    """n texts whose token counts ([CLS], [SEP] included) are uniform in 20..128."""
    out = []
    for target in rng.integers(20, 129, n):
        words = list(rng.choice(WORDS, int(target)))
        while True:
            text = " ".join(words) + "."
            length = len(model.tokenizer.encode(text).ids)
            if length <= target:
                break
            words.pop()
        out.append(text)
    return out


def torch_runner(model_dir: Path, batches: List[se.Tokens], torch: Any) -> Callable[[], object]:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    inputs = [(torch.from_numpy(t.ids), torch.from_numpy(t.mask.astype(np.int64)),
               torch.from_numpy(t.type_ids)) for t in batches]

    def run() -> object:
        out = []
        with torch.inference_mode():
            for ids, mask, types in inputs:
                h = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
                m = mask.unsqueeze(-1).to(h.dtype)
                e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(e, p=2, dim=1))
        return out

    return run


def profile(model: se.MiniLM, tokens: se.Tokens, rounds: int = 3) -> None:
    """Time the pieces of one batch's forward, as the encoder runs them with a
    right-padding mask (real tokens only, packed end to end through
    varlen_attention: TransformerEncoderLayer.forward_rows); pooling is left
    out."""
    from tileattn.activations import activation_
    from tileattn._padding import scatter_rows, take_rows
    from tileattn.linear import affine
    from tileattn.norm import layer_norm_

    acc: Dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        r = fn()
        acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
        return r

    for _ in range(rounds):
        x = timed("embeddings", lambda: model.embeddings_norm(
            np.take(model.word_embeddings, tokens.ids, axis=0)
            + model.position_embeddings[:tokens.ids.shape[1]] + model.token_type_embeddings[0]))
        b, length, e = x.shape
        mask = tokens.mask
        real = (mask, np.flatnonzero(mask), np.flatnonzero(~mask))
        idx = real[1]
        lengths = mask.sum(axis=1)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        rows = timed("gather/scatter rows", lambda: take_rows(x.reshape(-1, e), idx))
        for layer in model.encoder.layers:   # TransformerEncoderLayer.forward_rows, step by step
            a = layer.self_attn
            qkv_rows = timed("GEMM qkv (+bias)", lambda: a.projections.project_rows(rows))
            hd, nh = a.head_dim, a.num_heads
            qkv = qkv_rows.reshape(-1, 3, nh, hd)
            o = timed("attention core", lambda: tileattn.varlen_attention(
                qkv[:, 0], qkv[:, 1], qkv[:, 2], offsets))
            y = timed("GEMM out_proj (+bias)", lambda: a.projections.output_rows(
                o.reshape(-1, nh * hd)))
            timed("residual adds", lambda: y.__iadd__(rows))
            x1 = timed("layernorm", lambda: layer_norm_(y, layer.norm1))
            h = timed("GEMM linear1", lambda: affine(x1, layer.linear1.packed_weight(), None))
            timed("gelu (+bias)", lambda: activation_("gelu", h, layer.linear1.bias))
            z = timed("GEMM linear2 (+bias)", lambda: affine(h, layer.linear2.packed_weight(),
                                                             layer.linear2.bias))
            timed("residual adds", lambda: z.__iadd__(x1))
            rows = timed("layernorm", lambda: layer_norm_(z, layer.norm2))
        timed("gather/scatter rows", lambda: scatter_rows(rows, real, x.shape, np.float32))
    total = sum(acc.values())
    t_full = statistics.median(paired_times({"f": lambda: se.pool(model.hidden_states(tokens),
                                                                   tokens.mask)},
                                            rounds=rounds, warmup=1)["f"])
    print(f"\nprofile of one batch {tokens.ids.shape}, {int(tokens.mask.sum())} real tokens "
          f"(median forward {t_full * 1e3:.1f} ms):")
    for name, t in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {t / rounds * 1e3:8.2f} ms  {100 * t / total:5.1f}%")


def main(argv: Any = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, default=4, help="batches of 32 per round")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    tileattn.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)

    model = se.load_minilm()
    rng = np.random.default_rng(0)
    texts = [sentences(model, args.batch_size, rng) for _ in range(args.batches)]
    t0 = time.perf_counter()
    batches = [model.tokenize(t) for t in texts]
    t_tok = time.perf_counter() - t0
    n = args.batch_size * args.batches
    lengths = np.concatenate([b.mask.sum(1) for b in batches])
    print(f"{args.threads} threads, torch {torch.__version__}, tileattn {tileattn.__version__}; "
          f"{args.batches} batches of {args.batch_size}, tokens per sentence "
          f"{lengths.min()}-{lengths.max()} (mean {lengths.mean():.0f}), padded to "
          f"{[b.ids.shape[1] for b in batches]}; tokenising all: {t_tok * 1e3:.1f} ms")

    def run_tileattn() -> object:
        return [se.pool(model.hidden_states(t), t.mask) for t in batches]

    run_torch = torch_runner(se.model_dir(), batches, torch)
    got = np.concatenate(run_tileattn())
    want = np.concatenate([e.numpy() for e in run_torch()])  # type: ignore[attr-defined]
    times = paired_times({"tileattn": run_tileattn, "torch": run_torch},
                         rounds=args.rounds, warmup=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    # CPU seconds (all threads) per round: steadier than wall time when other
    # processes share the cores.
    cpu: Dict[str, List[float]] = {"tileattn": [], "torch": []}
    for _ in range(3):
        for k, fn in (("tileattn", run_tileattn), ("torch", run_torch)):
            c0 = time.process_time()
            fn()
            cpu[k].append(time.process_time() - c0)
    print(f"{'':10s} {'median s':>9s} {'sentences/s':>12s} {'cpu s':>7s}")
    for k in ("tileattn", "torch"):
        print(f"{k:10s} {med[k]:9.3f} {n / med[k]:12.1f} {statistics.median(cpu[k]):7.3f}")
    print(f"tileattn / torch speed: {median_ratio(times['torch'], times['tileattn']):.2f}x "
          f"(median of {len(times['torch'])} paired rounds); max |embedding diff| "
          f"{np.max(np.abs(got - want)):.2e}")
    if args.profile:
        profile(model, batches[0])


if __name__ == "__main__":
    main()
