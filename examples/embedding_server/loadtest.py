"""The load test: a service in its own process, many concurrent clients in
this one, every answer checked against a direct call.

Each client is a thread with one keep-alive connection (a reset or refused
connection is counted and reopened). The report gives throughput, latency
percentiles, errors, wrong answers, and the batches the service formed
(from its /metrics, read before and after).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

LOOPBACK = "127.0.0.1"

SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "The girl is carrying a baby.", "A man is riding a horse.",
    "A woman is playing violin.", "Two men pushed carts through the woods.",
    "A monkey is playing drums.", "Flash attention never materialises the score matrix.",
    "Sliding windows keep the memory of a stream bounded.",
    "The quick brown fox jumps over the lazy dog, " * 6,
]


def request_mix(n: int, seed: int = 0, sizes: Tuple[int, int] = (1, 4)) -> List[List[str]]:
    """n requests of sizes[0]..sizes[1] sentences each (fixed by the seed)."""
    rng = np.random.default_rng(seed)
    return [[SENTENCES[i] for i in rng.integers(0, len(SENTENCES),
                                                 rng.integers(sizes[0], sizes[1] + 1))]
            for _ in range(n)]


def start_service(command: Sequence[str], timeout: float = 180.0
                  ) -> Tuple["subprocess.Popen[str]", int]:
    """Start a service process that prints ``... http://127.0.0.1:PORT/...``
    once it listens; the process and its port."""
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        _, err = proc.communicate(timeout=timeout)
        raise RuntimeError(f"the service did not start: {line!r} {err[-2000:]}")
    return proc, int(m.group(1))


def stop_service(proc: "subprocess.Popen[str]", timeout: float = 60.0) -> int:
    """SIGINT (a graceful stop), then wait; the exit status."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    return int(proc.returncode)


def post_json(conn: http.client.HTTPConnection, path: str, payload: Any
              ) -> Tuple[int, Dict[str, Any]]:
    conn.request("POST", path, body=json.dumps(payload).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, json.loads(data) if data else {}


def batch_counters(port: int) -> Dict[str, float]:
    """The batch histograms' sums and counts from the service's /metrics
    (empty if it has none, as the old threaded service)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        if resp.status != 200:
            return {}
    finally:
        conn.close()
    out = {}
    for name in ("embedding_batch_texts", "embedding_batch_requests"):
        for part in ("sum", "count"):
            m = re.search(rf"^{name}_{part} ([0-9.e+]+)$", text, re.M)
            if m:
                out[f"{name}_{part}"] = float(m.group(1))
    return out


Check = Callable[[List[str], np.ndarray], Optional[str]]


def exact_check(expect: Callable[[List[str]], np.ndarray], requests: Sequence[List[str]]
                ) -> Check:
    """Answers must have the bits of ``expect(texts)`` (computed once per
    distinct request, before the clients start)."""
    want = {tuple(t): expect(list(t)) for t in {tuple(r) for r in requests}}

    def check(texts: List[str], got: np.ndarray) -> Optional[str]:
        w = want[tuple(texts)]
        if got.shape != w.shape or not np.array_equal(got, w):
            return "embeddings differ from a direct call"
        return None
    return check


def close_check(expect: Callable[[List[str]], np.ndarray], requests: Sequence[List[str]],
                atol: float) -> Check:
    """Answers within atol of ``expect(texts)`` (for a backend whose results
    depend on the batch)."""
    want = {tuple(t): expect(list(t)) for t in {tuple(r) for r in requests}}

    def check(texts: List[str], got: np.ndarray) -> Optional[str]:
        w = want[tuple(texts)]
        if got.shape != w.shape or not np.allclose(got, w, rtol=0, atol=atol):
            return f"embeddings differ from a direct call by more than {atol}"
        return None
    return check


def run_clients(port: int, requests: Sequence[List[str]], concurrency: int, check: Check,
                path: str = "/embed", timeout: float = 120.0) -> Dict[str, Any]:
    """Send every request once from ``concurrency`` client threads; stats."""
    latencies: List[float] = []
    answered_texts = [0]
    wrong: List[str] = []
    errors: List[str] = []
    lock = threading.Lock()
    chunks = [list(range(i, len(requests), concurrency)) for i in range(concurrency)]
    before = batch_counters(port)

    def client(indices: List[int]) -> None:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        try:
            for i in indices:
                texts = requests[i]
                payload = {"texts": texts} if path == "/embed" else {"input": texts}
                t0 = time.perf_counter()
                try:
                    status, answer = post_json(conn, path, payload)
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
                    with lock:
                        errors.append(f"request {i}: {type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t0
                problem = None
                if status != 200:
                    problem = f"request {i}: status {status} {answer}"
                else:
                    rows = (answer["embeddings"] if path == "/embed"
                            else [d["embedding"] for d in answer["data"]])
                    problem = check(texts, np.asarray(rows, np.float32))
                with lock:
                    latencies.append(dt)
                    answered_texts[0] += len(texts)
                    if problem:
                        wrong.append(f"request {i}: {problem}")
        finally:
            conn.close()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client, c) for c in chunks]:
            f.result()
    wall = time.perf_counter() - t0
    after = batch_counters(port)
    ms = sorted(x * 1e3 for x in latencies) or [float("nan")]

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]

    batches = {}
    for name in ("texts", "requests"):
        key = f"embedding_batch_{name}"
        if f"{key}_count" in after:
            n = after[f"{key}_count"] - before.get(f"{key}_count", 0)
            s = after[f"{key}_sum"] - before.get(f"{key}_sum", 0)
            batches[f"{name}_per_batch"] = s / n if n else 0.0
            batches["batches"] = n
    return {"requests": len(requests), "answered": len(latencies), "errors": errors,
            "wrong": wrong, "concurrency": concurrency, "seconds": wall,
            "requests_per_s": len(latencies) / wall,
            "texts_per_s": answered_texts[0] / wall,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": ms[-1],
                           "mean": statistics.fmean(ms)},
            "batches": batches}


def summary(stats: Dict[str, Any]) -> str:
    lat, b = stats["latency_ms"], stats["batches"]
    line = (f"{stats['requests']} requests, {stats['concurrency']} concurrent clients, "
            f"{len(stats['errors'])} errors, {len(stats['wrong'])} wrong, "
            f"{stats['seconds']:.2f} s: {stats['requests_per_s']:.1f} requests/s "
            f"({stats['texts_per_s']:.1f} texts/s); latency p50 {lat['p50']:.1f} ms, "
            f"p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    if b:
        line += (f"; {b['batches']:.0f} batches, {b['requests_per_batch']:.1f} requests "
                 f"({b['texts_per_batch']:.1f} texts) per batch")
    return line


def service_command(script: str, *args: str) -> List[str]:
    return [sys.executable, script, "serve", "--port", "0", *args]
