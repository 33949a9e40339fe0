"""Run the app under uvicorn on a socket we bind ourselves: the port is known
(and already accepting into the listen backlog) before uvicorn starts, so a
caller that asked for port 0 can be told the real one."""

from __future__ import annotations

import socket
from typing import Callable

import uvicorn
from starlette.applications import Starlette

from .limits import Limits
from .protocol import guarded_protocol

LOOPBACK = "127.0.0.1"


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on the accepted sockets only
    # then. Without it a response's head and body went out as two segments,
    # the second held by Nagle until the client's delayed ACK: +40 ms a request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def serve(app: Starlette, limits: Limits, host: str = LOOPBACK, port: int = 8000,
          on_listening: Callable[[str, int], None] = lambda host, port: None,
          log_level: str = "warning") -> None:
    """Serve until SIGINT or SIGTERM, then finish in-flight requests (up to
    limits.shutdown_timeout) and return."""
    sock = listening_socket(host, port, limits.backlog)
    on_listening(host, int(sock.getsockname()[1]))
    config = uvicorn.Config(
        app, http=guarded_protocol(limits), lifespan="on", log_level=log_level,
        access_log=False, backlog=limits.backlog,
        timeout_keep_alive=limits.idle_timeout,          # type: ignore[arg-type]
        timeout_graceful_shutdown=limits.shutdown_timeout,  # type: ignore[arg-type]
        server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn re-raises the SIGINT it stopped on, once in-flight requests
        # are done: a stop asked for, not an error.
        pass
