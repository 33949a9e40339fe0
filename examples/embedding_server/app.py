"""The ASGI app (Starlette): routes, body reading under limits, JSON errors,
metrics, and the batcher's lifetime.

Endpoints::

    POST /embed          {"texts": [...]} or {"text": "..."}
                         -> {"model", "dim", "embeddings": [[...], ...]}
    POST /v1/embeddings  OpenAI's request and response (input, model,
                         encoding_format float|base64, data/index/usage)
    GET  /health         {"status": "ok", "queued_texts": n}
    GET  /metrics        Prometheus text format

Errors are ``{"error": "<what was wrong>"}``, except under ``/v1/`` where
they take OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .backends import Backend
from .batcher import Batcher, QueueFull
from .limits import Limits, RequestError
from .metrics import Metrics
from .parse import embed_request, openai_request

RETRY_AFTER_SECONDS = 1
# Requests with more characters than this are tokenised (to count their
# tokens) in a worker thread: a full request (64 texts of 4096 characters)
# takes milliseconds that would otherwise stall every connection's I/O.
INLINE_TOKENIZE_CHARS = 4096


class FastJSONResponse(Response):
    """JSON by orjson, NumPy arrays included: each float32 as the shortest
    decimal that reads back to the same float32 (so a client's float32 has
    the exact bits), ~18x faster than json.dumps of ``rows.tolist()``, which
    took ~10% of the service's CPU under load (BENCHMARKS.md)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def create_app(backend: Backend, count_tokens: Callable[[List[str]], List[int]],
               limits: Limits = Limits(), *, token_budget: int = 4096,
               max_wait: float = 0.002) -> Starlette:
    """The service around ``backend``: its batcher starts and stops with the
    app (ASGI lifespan), after the server has finished in-flight requests."""
    metrics = Metrics()
    holder: Dict[str, Batcher] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher = Batcher(backend.embed, token_budget=token_budget, max_wait=max_wait,
                          max_queued_texts=limits.max_queued_texts, observer=metrics)
        batcher.start()
        holder["batcher"] = batcher
        try:
            yield
        finally:
            await batcher.stop()

    async def compute(texts: List[str], field: str) -> "tuple[np.ndarray, int]":
        """Rows for texts, and their token count, after the token limits."""
        if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
            counts = count_tokens(texts)
        else:
            counts = await asyncio.to_thread(count_tokens, texts)
        for i, n in enumerate(counts):
            if n > limits.max_tokens and not limits.truncate:
                raise RequestError(422, f"{field}[{i}]: at most {limits.max_tokens} tokens "
                                        f"(max_tokens), got {n}", field)
        tokens = sum(min(n, backend.max_length) for n in counts)
        batcher = holder["batcher"]
        try:
            rows = await batcher.embed(texts, tokens)
        except QueueFull as e:
            raise RequestError(503, f"the service is busy: {e}; retry later") from None
        metrics.queued_texts.set(batcher.queued_texts)
        return rows, tokens

    async def embed(request: Request) -> Response:
        t0 = time.perf_counter()
        metrics.requests.labels("/embed").inc()
        texts = embed_request(await read_body(request, limits), limits)
        rows, _ = await compute(texts, "texts")
        metrics.latency.labels("/embed").observe(time.perf_counter() - t0)
        return FastJSONResponse({"model": backend.name, "dim": backend.dim,
                                 "embeddings": rows})

    async def openai_embeddings(request: Request) -> Response:
        t0 = time.perf_counter()
        metrics.requests.labels("/v1/embeddings").inc()
        parsed = openai_request(await read_body(request, limits), limits, backend.dim)
        rows, tokens = await compute(parsed.texts, "input")
        data: List[Dict[str, Any]] = []
        for i, row in enumerate(rows):
            vector: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                           if parsed.encoding_format == "base64" else row)
            data.append({"object": "embedding", "index": i, "embedding": vector})
        metrics.latency.labels("/v1/embeddings").observe(time.perf_counter() - t0)
        return FastJSONResponse({"object": "list", "data": data, "model": backend.name,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def health(request: Request) -> Response:
        batcher = holder.get("batcher")
        return JSONResponse({"status": "ok",
                             "queued_texts": batcher.queued_texts if batcher else 0})

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=Metrics.CONTENT_TYPE)

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return error_response(request, exc.status, exc.message, exc.param)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no such resource {request.url.path!r}; the service has POST "
                        "/embed, POST /v1/embeddings, GET /health and GET /metrics",
                   405: f"method {request.method} not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        return error_response(request, exc.status_code, message, None)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(request, 500, f"internal error ({type(exc).__name__}); "
                                            "the service is still running", None)

    app = Starlette(
        routes=[Route("/embed", embed, methods=["POST"]),
                Route("/v1/embeddings", openai_embeddings, methods=["POST"]),
                Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics_text, methods=["GET"])],
        exception_handlers={RequestError: request_error, HTTPException: http_error,
                            Exception: internal_error},
        lifespan=lifespan)
    app.add_middleware(CountResponses, metrics=metrics)
    return app


def error_response(request: Request, status: int, message: str,
                   param: Optional[str]) -> Response:
    """``{"error": message}``, or OpenAI's error object under /v1/. A body
    left unread, or a refused size, closes the connection."""
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        payload: Dict[str, Any] = {"error": {"message": message, "type": kind,
                                             "param": param, "code": None}}
    else:
        payload = {"error": message}
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 503 else {}
    if status in (408, 411, 413):
        headers["Connection"] = "close"
    return JSONResponse(payload, status_code=status, headers=headers)


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body: at most max_body_bytes (413), in full within
    body_timeout (408); a POST must say its length (411)."""
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        raise RequestError(411, "Content-Length: required")
    if length is not None and int(length) > limits.max_body_bytes:    # the parser checked the digits
        raise RequestError(413, f"body: at most {limits.max_body_bytes} bytes (max_body_bytes), "
                                f"got {int(length)}")
    chunks: List[bytes] = []

    async def collect() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise RequestError(413, f"body: at most {limits.max_body_bytes} bytes "
                                        "(max_body_bytes)")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), limits.body_timeout)
    except asyncio.TimeoutError:
        raise RequestError(408, f"body: not received within {limits.body_timeout:g} s "
                                "(body_timeout)") from None
    return b"".join(chunks)


class CountResponses:
    """ASGI middleware: every response's status into the metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
