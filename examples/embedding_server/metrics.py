"""The service's Prometheus metrics (prometheus_client, a registry of its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Metrics:
    """Requests, responses by status, batch sizes, queue wait and latency."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedding_requests", "Requests received, by endpoint",
                                ["endpoint"], registry=r)
        self.responses = Counter("embedding_responses", "Responses sent, by HTTP status",
                                 ["status"], registry=r)
        self.latency = Histogram("embedding_request_seconds",
                                 "Time from a request's arrival to its answer, by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("embedding_queue_wait_seconds",
                                    "Time a request waited for its batch to start",
                                    buckets=_WAIT_BUCKETS, registry=r)
        self.batch_texts = Histogram("embedding_batch_texts", "Texts per model call",
                                     buckets=_SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("embedding_batch_requests",
                                        "Requests coalesced per model call",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("embedding_batch_tokens", "Tokens per model call",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("embedding_batch_seconds",
                                       "Time of one model call (a batch)",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queued_texts = Gauge("embedding_queued_texts", "Texts waiting for the model",
                                  registry=r)

    # BatchObserver
    def batch_formed(self, texts: int, tokens: int, requests: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)
        self.batch_requests.observe(requests)

    def batch_computed(self, seconds: float) -> None:
        self.batch_seconds.observe(seconds)

    def queue_waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
