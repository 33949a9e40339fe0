"""all-MiniLM-L6-v2 sentences per second with bf16 products: tileattn float32
and bf16 (``load_minilm(compute_dtype="bfloat16")``), PyTorch float32 and
OpenVINO (``openvino.convert_model`` of the transformers model, compiled
with ``INFERENCE_PRECISION_HINT`` f32 and bf16), on the batches of
bench_minilm.py (32 sentences of 20-128 tokens), in one process.

Every contender computes from token ids to normalised embeddings (OpenVINO's
hidden states pooled as tileattn's are). Contenders alternate after a
warm-up (paired_times); medians and paired ratios are reported, and the
smallest cosine similarity of a bf16 embedding to its float32 one (target
>= 0.999). `--engines` runs a subset (another engine's spinning pool can
bend a ratio: check one in separate processes).

    python benchmarks/bench_minilm_bf16.py [--rounds 7] [--batches 4] [--threads 2]
        [--engines tileattn tileattn-bf16 torch ov ov-bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

import tileattn
from tileattn._bench import median_ratio, paired_times

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sentence_embeddings as se  # noqa: E402
from bench_minilm import sentences, torch_runner  # noqa: E402


def tileattn_runner(model: se.MiniLM, batches: List[se.Tokens]) -> Callable[[], object]:
    return lambda: [se.pool(model.hidden_states(t), t.mask) for t in batches]


def openvino_runner(batches: List[se.Tokens], precision: str,
                    threads: int) -> Callable[[], object]:
    import openvino as ov
    import torch
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bert = transformers.AutoModel.from_pretrained(str(se.model_dir())).eval()
        t = batches[0]
        example = {"input_ids": torch.from_numpy(t.ids),
                   "attention_mask": torch.from_numpy(t.mask.astype(np.int64)),
                   "token_type_ids": torch.from_numpy(t.type_ids)}
        ov_model = ov.convert_model(bert, example_input=example)
    compiled = ov.Core().compile_model(ov_model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    inputs = [{"input_ids": t.ids, "attention_mask": t.mask.astype(np.int64),
               "token_type_ids": t.type_ids} for t in batches]

    def run() -> object:
        out = []
        for t, feed in zip(batches, inputs):
            hidden = request.infer(feed)[0]
            out.append(se.pool(np.asarray(hidden, np.float32), t.mask))
        return out

    return run


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+",
                    default=["tileattn", "tileattn-bf16", "torch", "ov", "ov-bf16"])
    args = ap.parse_args(argv)
    import torch

    tileattn.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    f32 = se.load_minilm()
    bf16 = se.load_minilm(compute_dtype="bfloat16")
    rng = np.random.default_rng(0)
    texts = [sentences(f32, args.batch_size, rng) for _ in range(args.batches)]
    batches = [f32.tokenize(t) for t in texts]
    n = args.batch_size * args.batches
    cfg = tileattn.config()
    print(f"{args.threads} threads; ISA path {cfg['isa_path_in_use']} (bf16 products: "
          f"{cfg['bf16_products']}); {args.batches} batches of {args.batch_size}")

    makers: Dict[str, Callable[[], Callable[[], object]]] = {
        "tileattn": lambda: tileattn_runner(f32, batches),
        "tileattn-bf16": lambda: tileattn_runner(bf16, batches),
        "torch": lambda: torch_runner(se.model_dir(), batches, torch),
        "ov": lambda: openvino_runner(batches, "f32", args.threads),
        "ov-bf16": lambda: openvino_runner(batches, "bf16", args.threads),
    }
    runners = {name: makers[name]() for name in args.engines}
    a = np.concatenate(tileattn_runner(f32, batches)())  # type: ignore[arg-type]
    b = np.concatenate(tileattn_runner(bf16, batches)())  # type: ignore[arg-type]
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    print(f"tileattn bf16 against float32: smallest cosine {cos.min():.6f} (target >= 0.999)")
    times = paired_times(runners, rounds=args.rounds, warmup=1)
    print(f"{'':14s} {'median s':>9s} {'sentences/s':>12s}")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:14s} {med:9.3f} {n / med:12.1f}")
    if "tileattn-bf16" in times:
        for other in times:
            if other != "tileattn-bf16":
                print(f"tileattn-bf16 / {other}: "
                      f"{median_ratio(times[other], times['tileattn-bf16']):.2f}x")


if __name__ == "__main__":
    main()
