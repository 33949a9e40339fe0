"""What the service accepts, in one place, and the error it answers with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Every bound the service enforces. Sizes in bytes, times in seconds.

    The defaults hold a 2-core machine steady under hostile clients; every
    one is a command-line option of ``embedding_service.py serve``.
    """

    max_body_bytes: int = 1 << 20        # 413 beyond
    max_texts: int = 64                  # texts per request, 413 beyond
    max_chars: int = 4096                # characters per text, 413 beyond
    max_tokens: int = 256                # tokens per text ([CLS]/[SEP] included), 422 beyond
    truncate: bool = False               # cut long texts at max_tokens instead of refusing
    max_target_bytes: int = 4096         # request line's target (path + query), 414 beyond
    max_headers: int = 64                # header lines, 431 beyond
    max_header_bytes: int = 16384        # all header names + values, 431 beyond
    header_timeout: float = 5.0          # first byte of a request to its last header, 408
    body_timeout: float = 10.0           # last header to the body's last byte, 408
    idle_timeout: float = 5.0            # connection without a request in flight
    max_connections: int = 512           # open connections; 503 to the next
    max_queued_texts: int = 2048         # texts waiting for the model; 503 + Retry-After
    backlog: int = 2048                  # listen queue: takes bursts of connections
    shutdown_timeout: float = 30.0       # in-flight requests get this long on SIGINT/SIGTERM

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, bool) and value <= 0:
                raise ValueError(f"{name}: expected > 0, got {value}")
        if self.max_texts > self.max_queued_texts:
            raise ValueError(f"max_queued_texts: expected >= max_texts ({self.max_texts}), "
                             f"got {self.max_queued_texts}")


class RequestError(Exception):
    """A request the service refuses: HTTP status, a message for the
    client, and the request field at fault (if one is)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
