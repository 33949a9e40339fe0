"""Timing helpers shared by ``python -m tileattn`` and ``benchmarks/``.

Machines here are shared and noisy, so contenders are timed in one process,
alternating A/B/C after a warm-up, and compared by medians and by the
median of per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .functional import scaled_dot_product_attention


@dataclass(frozen=True)
class Shape:
    b: int
    hq: int
    lq: int
    lk: int
    d: int
    hkv: Optional[int] = None
    causal: bool = False
    window: Optional[int] = None

    @property
    def kv_heads(self) -> int:
        return self.hkv or self.hq

    def label(self) -> str:
        s = f"{self.b},{self.hq},{self.lq},{self.lk},{self.d}"
        if self.hkv:
            s += f" gqa{self.hkv}"
        if self.causal:
            s += " causal"
        if self.window:
            s += f" win{self.window}"
        return s

    def visible_pairs(self) -> int:
        """Query-key pairs the masks let through (per batch and head)."""
        i = np.arange(self.lq, dtype=np.int64) + (self.lk - self.lq)
        hi = np.minimum(i, self.lk - 1) if (self.causal or self.window) else np.full_like(i, self.lk - 1)
        lo = np.maximum(i - self.window + 1, 0) if self.window else np.zeros_like(i)
        return int(np.maximum(hi - lo + 1, 0).sum())

    def flops(self) -> float:
        """4 * B * Hq * (visible pairs) * D: two matrix products per pair."""
        return 4.0 * self.b * self.hq * self.visible_pairs() * self.d

    def inputs(self, dtype: Any = np.float32, seed: int = 0) -> Tuple[np.ndarray, ...]:
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.b, self.hq, self.lq, self.d), dtype=np.float32)
        k = rng.standard_normal((self.b, self.kv_heads, self.lk, self.d), dtype=np.float32)
        v = rng.standard_normal((self.b, self.kv_heads, self.lk, self.d), dtype=np.float32)
        return tuple(a.astype(dtype, copy=False) for a in (q, k, v))


def numpy_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False,
                    window: Optional[int] = None) -> np.ndarray:
    """What a user would write by hand: dense scores, softmax, matmul."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = np.repeat(k, group, axis=1)
        v = np.repeat(v, group, axis=1)
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(1.0 / np.sqrt(q.shape[-1]))
    if causal or window:
        lq, lk = s.shape[-2:]
        i = np.arange(lq)[:, None] + (lk - lq)
        j = np.arange(lk)[None, :]
        ok = j <= i
        if window:
            ok &= j > i - window
        s = np.where(ok, s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    result: np.ndarray = np.matmul(s, v)
    return result


def tileattn_runner(shape: Shape, q: np.ndarray, k: np.ndarray,
                    v: np.ndarray) -> Callable[[], object]:
    kw: Dict[str, Any] = {}
    if shape.window:
        kw["window"] = shape.window
    elif shape.causal:
        kw["is_causal"] = True
    out = np.empty(q.shape[:-1] + (v.shape[-1],), q.dtype)
    return lambda: scaled_dot_product_attention(q, k, v, out=out, **kw)


def torch_runner(shape: Shape, q: np.ndarray, k: np.ndarray,
                 v: np.ndarray) -> Optional[Callable[[], object]]:
    """PyTorch's SDPA as a torch user would call it (None without torch).
    A window needs the equivalent dense boolean mask in torch."""
    try:
        import torch
    except ImportError:
        return None
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    kw: Dict[str, Any] = {}
    if shape.kv_heads != shape.hq:
        kw["enable_gqa"] = True
    if shape.window:
        i = torch.arange(shape.lq)[:, None] + (shape.lk - shape.lq)
        j = torch.arange(shape.lk)[None, :]
        kw["attn_mask"] = (j <= i) & (j > i - shape.window)
    elif shape.causal:
        if shape.lq == shape.lk:
            kw["is_causal"] = True
        else:
            i = torch.arange(shape.lq)[:, None] + (shape.lk - shape.lq)
            kw["attn_mask"] = torch.arange(shape.lk)[None, :] <= i

    def run() -> object:
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **kw)

    return run


# Untimed calls of at least this many seconds precede each timed call, for
# calls shorter than LEAD_IN_UNDER_S (see paired_times).
LEAD_IN_S = 0.15
LEAD_IN_UNDER_S = 1.0


def add_lead_in_argument(ap: Any) -> None:
    """The benchmarks' --lead-in option (an argparse parser's)."""
    ap.add_argument("--lead-in", type=float, default=LEAD_IN_S,
                    help="seconds of untimed calls before each timed one (0: off); "
                         "see _bench.paired_times")


def start(args: Any, *engines: Any) -> None:
    """Applies parsed benchmark options: the lead-in, and ``args.threads``
    (when it is one number) to tileattn and each engine given (e.g. torch)."""
    global LEAD_IN_S
    LEAD_IN_S = args.lead_in
    threads = getattr(args, "threads", None)
    if isinstance(threads, int):
        from ._threads import set_num_threads

        set_num_threads(threads)
        for engine in engines:
            engine.set_num_threads(threads)


def paired_times(runners: Dict[str, Callable[[], object]], rounds: int = 7,
                 warmup: int = 1, budget_s: Optional[float] = None,
                 lead_in_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Alternate the runners `rounds` times after `warmup` rounds; seconds each.

    The order rotates by one each round, so no runner always follows the same
    other one. Before each timed call, a runner whose calls take less than
    LEAD_IN_UNDER_S is called untimed until `lead_in_s` (default LEAD_IN_S;
    the scripts' --lead-in sets it, 0 turns it off) have passed. Why: BLAS
    and OpenMP pools keep their threads spinning after a call, and those
    threads take the cores from whichever contender runs next. Measured at
    (8, 12, 128, 128, 64), 2 threads: tileattn and torch 2.6 / 3.5 ms warm,
    4.9 / 7.5 ms for ~130 ms after an OpenBLAS matmul, and 2-3 calls (~10 ms)
    slower after a torch call (libgomp). Sleeping instead lets the cores go
    idle and cold (6-7 ms after a 50 ms pause). So each timed call is a warm
    call of that library alone, as in a loop that calls it repeatedly. With
    `budget_s`, stop early (after at least 3 rounds) once it is spent."""
    lead_in = LEAD_IN_S if lead_in_s is None else lead_in_s
    names = list(runners)
    last: Dict[str, float] = {}
    for _ in range(warmup):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            last[name] = time.perf_counter() - t0
    times: Dict[str, List[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = runners[name]
            if lead_in and last.get(name, 0.0) < LEAD_IN_UNDER_S:
                t_lead = time.perf_counter()
                fn()
                while time.perf_counter() - t_lead < lead_in:
                    fn()
            t0 = time.perf_counter()
            fn()
            last[name] = time.perf_counter() - t0
            times[name].append(last[name])
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median_ratio(slow: List[float], fast: List[float]) -> float:
    """Median over rounds of slow/fast (a paired ratio, robust to drift)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def matmul_gflops(n: int = 1024, rounds: int = 7, threads: Optional[int] = None) -> float:
    """The practical ceiling: float32 NumPy (BLAS) matmul GFLOP/s.

    With `threads`, measured in a fresh process whose BLAS is limited to that
    many threads (BLAS reads its thread count only at start-up)."""
    if threads is not None:
        import os
        import subprocess
        import sys

        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads))
        code = f"from tileattn._bench import matmul_gflops; print(matmul_gflops({n}, {rounds}))"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip())
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.copy()
    c = np.empty_like(a)
    t = paired_times({"mm": lambda: np.matmul(a, b, out=c)}, rounds=rounds, warmup=2)["mm"]
    return 2.0 * n**3 / statistics.median(t) / 1e9


def read_bandwidth(flat: np.ndarray, threads: int, rounds: int = 7) -> Tuple[float, List[str]]:
    """The machine's read bandwidth in bytes/s, for a roofline: the best
    median of NumPy summing ``flat`` in ``threads`` Python threads (each its
    share; NumPy releases the GIL) and of PyTorch's threaded sum, if PyTorch
    is installed; and the names of the readers that ran."""
    import threading
    parts = np.array_split(flat.reshape(-1), threads)

    def numpy_sum() -> None:
        ts = [threading.Thread(target=p.sum) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    readers: Dict[str, Callable[[], object]] = {"numpy sum": numpy_sum}
    try:
        import torch
        torch.set_num_threads(threads)
        tflat = torch.from_numpy(flat.reshape(-1))
        readers["torch sum"] = lambda: tflat.sum()
    except ImportError:
        pass
    t = paired_times(readers, rounds=rounds)
    return max(flat.nbytes / statistics.median(v) for v in t.values()), list(readers)
