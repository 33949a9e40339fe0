"""The embedding service under load: examples/embedding_service.py on
tileattn, against the thread-per-request service it replaced
(benchmarks/threaded_embedding_service.py) and against the same service code
with sentence-transformers (PyTorch, float32) as the backend.

Each contender runs in its own process, one at a time (the machine's cores
are the resource measured), started, warmed up, loaded by --concurrency
client threads in this process (one keep-alive connection each, requests of
1-4 sentences), and stopped; the contenders alternate in order over
--rounds rounds. Every answer is checked against a direct call made in this
process before the clients start: bit for bit for tileattn, within 1e-5 for
PyTorch (whose results depend on the batch). Reported: requests/s, p50/p99
latency, connection errors, wrong answers, the batches formed; medians over
rounds and the ratios of throughput.

Then the stalled-connection check on the tileattn service: a single
client's median latency without and with --stalled idle connections open
(half send nothing, half half a request head), and how long the service
takes to close them (its idle and header timeouts).

    python benchmarks/bench_service.py [--rounds 3] [--requests 512]
        [--concurrency 64] [--services tileattn,threaded,sentence-transformers]
        [--threads 2] [--stalled 40]
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from embedding_server import loadtest  # noqa: E402
from embedding_server.backends import BACKENDS  # noqa: E402

SERVICE = str(ROOT / "examples" / "embedding_service.py")
THREADED = str(ROOT / "benchmarks" / "threaded_embedding_service.py")


def command(name: str, threads: int) -> List[str]:
    t = ["--threads", str(threads)]
    if name == "threaded":
        return loadtest.service_command(THREADED, *t)
    return loadtest.service_command(SERVICE, "--backend", name, *t)


def one_run(name: str, threads: int, requests: List[List[str]], concurrency: int,
            check: loadtest.Check) -> Dict[str, Any]:
    proc, port = loadtest.start_service(command(name, threads))
    try:
        loadtest.run_clients(port, loadtest.request_mix(2 * concurrency, seed=99),
                             concurrency, lambda texts, got: None)          # warm-up
        return loadtest.run_clients(port, requests, concurrency, check)
    finally:
        loadtest.stop_service(proc)


def single_client_ms(port: int, n: int) -> List[float]:
    import http.client

    conn = http.client.HTTPConnection(loadtest.LOOPBACK, port, timeout=30)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            status, _ = loadtest.post_json(conn, "/embed", {"text": "A man is riding a horse."})
            out.append((time.perf_counter() - t0) * 1e3)
            assert status == 200
    finally:
        conn.close()
    return out


def stalled_check(threads: int, stalled: int, samples: int = 60) -> Dict[str, Any]:
    proc, port = loadtest.start_service(command("tileattn", threads))
    try:
        single_client_ms(port, 10)
        alone = statistics.median(single_client_ms(port, samples))
        socks = []
        for i in range(stalled):
            s = socket.create_connection((loadtest.LOOPBACK, port))
            if i % 2:
                s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\n")        # half a head
            socks.append((s, i % 2, time.perf_counter()))
        with_stalled = statistics.median(single_client_ms(port, samples))
        closed: Dict[int, List[float]] = {0: [], 1: []}
        with selectors.DefaultSelector() as sel:
            for s, kind, opened in socks:
                sel.register(s, selectors.EVENT_READ, (kind, opened))
            deadline = time.perf_counter() + 120
            while sel.get_map() and time.perf_counter() < deadline:
                for key, _ in sel.select(timeout=1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if not sock.recv(65536):            # closed by the service
                        kind, opened = key.data
                        closed[kind].append(time.perf_counter() - opened)
                        sel.unregister(sock)
                        sock.close()
    finally:
        loadtest.stop_service(proc)
    return {"alone_ms": alone, "with_stalled_ms": with_stalled,
            "silent_closed_s": max(closed[0]), "half_head_closed_s": max(closed[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--services", default="tileattn,threaded,sentence-transformers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stalled", type=int, default=40)
    args = ap.parse_args()
    names = args.services.split(",")
    requests = loadtest.request_mix(args.requests)
    direct: Any = BACKENDS["tileattn"]()
    checks = {"tileattn": loadtest.exact_check(direct.embed, requests)}
    checks["threaded"] = checks["tileattn"]
    if "sentence-transformers" in names:
        peer: Any = BACKENDS["sentence-transformers"]()
        checks["sentence-transformers"] = loadtest.close_check(peer.embed, requests, 1e-5)
        del peer
    del direct
    results: Dict[str, List[Dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            stats = one_run(name, args.threads, requests, args.concurrency, checks[name])
            results[name].append(stats)
            print(f"round {r} {name:>21}: {loadtest.summary(stats)}", flush=True)
    print(f"\nmedians over {args.rounds} rounds ({args.requests} requests, "
          f"{args.concurrency} clients, {args.threads} threads):")
    med: Dict[str, Dict[str, float]] = {}
    for name in names:
        runs = results[name]
        med[name] = {k: statistics.median(x[k] if k == "requests_per_s" else x["latency_ms"][k]
                                          for x in runs)
                     for k in ("requests_per_s", "p50", "p99")}
        errors = sum(len(x["errors"]) for x in runs)
        wrong = sum(len(x["wrong"]) for x in runs)
        print(f"  {name:>21}: {med[name]['requests_per_s']:7.1f} requests/s, p50 "
              f"{med[name]['p50']:7.1f} ms, p99 {med[name]['p99']:7.1f} ms, "
              f"{errors} errors, {wrong} wrong")
    if "tileattn" in med:
        for other in names:
            if other != "tileattn":
                ratios = [a["requests_per_s"] / b["requests_per_s"]
                          for a, b in zip(results["tileattn"], results[other])]
                print(f"  tileattn / {other}: throughput x{statistics.median(ratios):.2f} "
                      f"(per round {', '.join(f'{x:.2f}' for x in ratios)}), p99 "
                      f"{med['tileattn']['p99']:.0f} vs {med[other]['p99']:.0f} ms")
    if args.stalled:
        s = stalled_check(args.threads, args.stalled)
        print(f"\n{args.stalled} stalled connections: single-client median "
              f"{s['alone_ms']:.1f} ms alone, {s['with_stalled_ms']:.1f} ms with them open "
              f"(+{s['with_stalled_ms'] - s['alone_ms']:.1f} ms); closed after "
              f"{s['silent_closed_s']:.1f} s (silent, idle timeout) and "
              f"{s['half_head_closed_s']:.1f} s (half a head, header timeout)")


if __name__ == "__main__":
    main()
