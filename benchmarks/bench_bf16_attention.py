"""bf16 attention: tileattn float32, tileattn with bf16 products
(``compute_dtype="bfloat16"``), PyTorch's SDPA on bf16 tensors, and
OpenVINO's ``ScaledDotProductAttention`` op compiled with
``INFERENCE_PRECISION_HINT=bf16`` (float32 in and out), on the performance
benchmark's shapes 1-5, in one process.

Contenders alternate after a warm-up (``tileattn._bench.paired_times``), each
timed call preceded by untimed calls of the same contender for 0.15 s, so a
thread pool another engine left spinning (OpenVINO's, PyTorch's OpenMP)
has gone quiet or is the contender's own. Medians and the paired median
ratios are reported. OpenVINO is given K and V already repeated to the
query heads on the GQA shape (its SDPA op broadcasts only heads of 1), so
its figure there leaves out the repeat.

`--engines` runs a subset, e.g. each engine in its own process to check a
ratio that pool spinning may have bent (tileattn's pair stays in one).

    python benchmarks/bench_bf16_attention.py [--threads 2 1] [--rounds 7]
        [--shapes 1 2 3 3c 4 5] [--engines f32 bf16 torch ov]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Callable, Dict, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import SHAPES  # noqa: E402

import tileattn  # noqa: E402
from tileattn._bench import Shape, median_ratio, paired_times  # noqa: E402


def tileattn_runner(shape: Shape, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    compute_dtype: Optional[str]) -> Callable[[], object]:
    out = np.empty(q.shape[:-1] + (v.shape[-1],), np.float32)
    return lambda: tileattn.scaled_dot_product_attention(
        q, k, v, out=out, is_causal=shape.causal, compute_dtype=compute_dtype)


def torch_bf16_runner(shape: Shape, q: np.ndarray, k: np.ndarray,
                      v: np.ndarray) -> Optional[Callable[[], object]]:
    try:
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(a).to(torch.bfloat16) for a in (q, k, v))
    kw: Dict[str, Any] = {"is_causal": shape.causal}
    if shape.kv_heads != shape.hq:
        kw["enable_gqa"] = True

    def run() -> object:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)

    return run


def openvino_bf16_runner(shape: Shape, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                         threads: int) -> Optional[Callable[[], object]]:
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError:
        return None
    group = shape.hq // shape.kv_heads
    k, v = (np.ascontiguousarray(np.repeat(a, group, axis=1)) for a in (k, v))
    params = [ops.parameter(list(a.shape), np.float32, name=n) for n, a in
              (("q", q), ("k", k), ("v", v))]
    sdpa = ops.scaled_dot_product_attention(*params, causal=shape.causal)
    compiled = ov.Core().compile_model(ov.Model([sdpa], params), "CPU", {
        "INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    inputs = {"q": q, "k": k, "v": v}
    return lambda: request.infer(inputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=["1", "2", "3", "3c", "4", "5"])
    ap.add_argument("--engines", nargs="+", default=["f32", "bf16", "torch", "ov"])
    args = ap.parse_args()
    cfg = tileattn.config()
    print(f"ISA path {cfg['isa_path_in_use']}; bf16 products: {cfg['bf16_products']}")
    for threads in args.threads:
        tileattn.set_num_threads(threads)
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            pass
        print(f"\n== {threads} thread(s): median ms; ratios are paired medians ==")
        print(f"{'shape':5s} {'f32':>8s} {'bf16':>8s} {'torch bf16':>10s} {'OV bf16':>8s} "
              f"{'f32/bf16':>9s} {'OV/bf16':>8s} {'torch/bf16':>10s}")
        for key in args.shapes:
            shape = SHAPES[key]
            q, k, v = shape.inputs()
            makers = {"f32": lambda: tileattn_runner(shape, q, k, v, None),
                      "bf16": lambda: tileattn_runner(shape, q, k, v, "bfloat16"),
                      "torch": lambda: torch_bf16_runner(shape, q, k, v),
                      "ov": lambda: openvino_bf16_runner(shape, q, k, v, threads)}
            runners = {}
            for name in args.engines:
                runner = makers[name]()
                if runner is not None:
                    runners[name] = runner
            t = paired_times(runners, rounds=args.rounds)
            ms = {n: statistics.median(x) * 1e3 for n, x in t.items()}
            cell = lambda n: f"{ms[n]:.2f}" if n in ms else "-"  # noqa: E731
            ratio = lambda n: (f"{median_ratio(t[n], t['bf16']):.2f}x"  # noqa: E731
                               if n in t and "bf16" in t else "-")
            print(f"{key:5s} {cell('f32'):>8s} {cell('bf16'):>8s} {cell('torch'):>10s} "
                  f"{cell('ov'):>8s} {ratio('f32'):>9s} {ratio('ov'):>8s} {ratio('torch'):>10s}")


if __name__ == "__main__":
    main()
