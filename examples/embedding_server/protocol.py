"""uvicorn's httptools protocol with the limits a public service needs on
the request head, enforced before the app sees a request:

- a connection that sends nothing is closed after ``idle_timeout`` (uvicorn
  arms its keep-alive timer only after a first response);
- a request head (first byte to last header) must arrive within
  ``header_timeout``, else 408: a client trickling bytes is not held;
- a request target over ``max_target_bytes`` is 414; more than
  ``max_headers`` header lines or a head over ``max_header_bytes`` is 431;
- past ``max_connections`` open connections the next one gets 503;
- a request the parser refuses (garbage request line, a repeated
  Content-Length, ...) is a JSON 400 naming what the parser found, where
  uvicorn would answer in plain text.

Every such answer is ``{"error": "..."}`` with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import http
import json
import sys
from typing import Optional, Type

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .limits import Limits


class HeadRefused(Exception):
    """Raised from a parser callback: the request head breaks a limit."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response: ``{"error": message}``, then close."""
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def guarded_protocol(limits: Limits) -> Type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _head_timer: Optional[asyncio.TimerHandle] = None
        _head_bytes = 0            # bytes received while the current head is incomplete
        _header_lines = 0
        _header_bytes = 0          # names + values of the current head's headers
        _in_head = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            if len(self.connections) > limits.max_connections:
                self._refuse(503, f"the service holds {limits.max_connections} connections "
                                  "(max_connections); retry later")
                return
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head:
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_target_bytes + limits.max_header_bytes:
                    self._refuse(431, f"headers: at most {limits.max_header_bytes} bytes of "
                                      "names and values (max_header_bytes)")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            self._header_lines = self._header_bytes = 0
            self._stop_head_timer()
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_late)

        def on_url(self, url: bytes) -> None:
            if len(self.url) + len(url) > limits.max_target_bytes:
                raise HeadRefused(414, f"request target: at most {limits.max_target_bytes} "
                                       "bytes (max_target_bytes)")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_lines += 1
            self._header_bytes += len(name) + len(value)
            if self._header_lines > limits.max_headers:
                raise HeadRefused(431, f"headers: at most {limits.max_headers} header lines "
                                       "(max_headers)")
            if self._header_bytes > limits.max_header_bytes:
                raise HeadRefused(431, f"headers: at most {limits.max_header_bytes} bytes of "
                                       "names and values (max_header_bytes)")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this while handling the parser's exception: a
            # callback's HeadRefused is that exception's context.
            error = sys.exc_info()[1]
            refused = error.__context__ if error is not None else None
            if isinstance(refused, HeadRefused):
                self._refuse(refused.status, refused.message)
            else:
                self._refuse(400, f"malformed HTTP request ({error or msg})")

        def _head_late(self) -> None:
            self._head_timer = None
            self._refuse(408, f"request head: not complete within {limits.header_timeout:g} s "
                              "(header_timeout)")

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, status: int, message: str) -> None:
            self._in_head = False
            self._stop_head_timer()
            if not self.transport.is_closing():
                self.transport.write(json_error_response(status, message))
                self.transport.close()

    return GuardedHttpToolsProtocol
