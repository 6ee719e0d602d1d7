"""Connection-level limits uvicorn lacks: a time limit on each request head, a connection cap.

uvicorn closes a kept-alive connection that stays idle after an answer (`timeout_keep_alive`)
and bounds the request head's size, but a connection that never sends a complete head - opened
and left idle, or fed one byte a second (slowloris) - stays open for ever. `ConnectionLimits`
gives each request head `header_timeout` seconds from the connection's start (or, after an
answer, from the next request's first byte), then answers 408 and closes, and answers 503 to a
connection over `max_connections`. Both answers are OpenAI-format JSON. The body's time limit
is the route's (it reads the body; seechat/inference/serve/routes.py).

Built on public interfaces only, nothing of uvicorn's protocol internals: `protocol()` is an
`asyncio.Protocol` that wraps the HTTP protocol uvicorn picks by itself (`--http auto`) and
forwards every callback to it, watching the bytes for the end of the head (a blank line); an
ASGI middleware (`wrap`) tells it when an answer has ended, so the next head is timed again.
The middleware sits outside uvicorn's `ProxyHeadersMiddleware`, which it applies itself, so it
sees the connection's own address (an X-Forwarded-For never hides which connection answered).
"""
from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from seechat.inference.serve.errors import error_body

HEAD_ENDS = (b"\n\r\n", b"\n\n")  # a head ends with an empty line (CRLF, or a bare LF h11 accepts)


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    body = json.dumps(error_body(status, message, None, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode() + body


def _peer(address: Any) -> tuple[str, int] | None:
    """A TCP peer as (host, port), as uvicorn puts it in the ASGI scope's "client"."""
    if isinstance(address, (tuple, list)) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class ConnectionLimits:
    """The head time limit and the connection cap of one server: `protocol()` for uvicorn's
    `http` option, `wrap(app)` around the application."""

    def __init__(self, header_timeout: float, max_connections: int):
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.open: dict[tuple[str, int], Any] = {}  # admitted connections by peer address
        self.count = 0
        self.slow = _raw_response(408, "Request Timeout",
                                  f"the request head did not arrive within {header_timeout:g} s", "timeout")
        self.busy = _raw_response(503, "Service Unavailable", "too many open connections; retry shortly",
                                  "server_busy", "retry-after: 1\r\n")

    def answered(self, client: Any) -> None:
        """From the middleware: the answer on `client`'s connection has ended."""
        connection = self.open.get(_peer(client))
        if connection is not None:
            connection.await_head()

    def wrap(self, app, proxy_headers: bool = True, forwarded_allow_ips: str | list[str] | None = None):
        """`app` behind uvicorn's proxy-headers middleware (when `proxy_headers`, trusting
        `forwarded_allow_ips` as uvicorn does) and this one; run it with `proxy_headers=False`."""
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        if proxy_headers:
            trusted = forwarded_allow_ips or os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
            app = ProxyHeadersMiddleware(app, trusted_hosts=trusted)
        limits = self

        async def answer_ends(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            client = scope.get("client")

            async def sending(message):
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    limits.answered(client)

            await app(scope, receive, sending)

        return answer_ends

    def protocol(self, http: str = "auto") -> type:
        """An asyncio protocol class for uvicorn's `http` option, wrapping uvicorn's `http` one."""
        from uvicorn.config import HTTP_PROTOCOLS
        from uvicorn.importer import import_from_string

        inner_class = import_from_string(HTTP_PROTOCOLS[http])
        limits = self

        class LimitedProtocol(asyncio.Protocol):
            def __init__(self, *args: Any, **kwargs: Any):
                self.inner = inner_class(*args, **kwargs)
                self.transport: Any = None
                self.admitted, self.awaiting_head, self.tail = False, True, b""
                self.peer: tuple[str, int] | None = None
                self.timer: asyncio.TimerHandle | None = None

            def connection_made(self, transport) -> None:  # type: ignore[override]
                self.transport = transport
                if limits.count >= limits.max_connections:
                    transport.write(limits.busy)
                    transport.close()
                    return
                self.admitted = True
                limits.count += 1
                self.peer = _peer(transport.get_extra_info("peername"))
                if self.peer is not None:
                    limits.open[self.peer] = self
                self.inner.connection_made(transport)
                self._arm()

            def await_head(self) -> None:
                """The answer has ended: the next bytes begin a head (timed from the first)."""
                self.awaiting_head, self.tail = True, b""

            def _arm(self) -> None:
                if self.timer is None:
                    self.timer = asyncio.get_running_loop().call_later(limits.header_timeout, self._too_slow)

            def _disarm(self) -> None:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None

            def _too_slow(self) -> None:
                self.timer = None
                if self.awaiting_head and not self.transport.is_closing():
                    self.transport.write(limits.slow)
                    self.transport.close()

            def data_received(self, data: bytes) -> None:
                if not self.admitted:
                    return
                if self.awaiting_head:
                    seen = self.tail + data
                    if any(end in seen for end in HEAD_ENDS):
                        self.awaiting_head = False
                        self._disarm()
                    else:
                        self.tail = seen[-2:]
                        self._arm()
                self.inner.data_received(data)

            def eof_received(self) -> bool | None:
                return self.inner.eof_received() if self.admitted else None

            def pause_writing(self) -> None:
                if self.admitted:
                    self.inner.pause_writing()

            def resume_writing(self) -> None:
                if self.admitted:
                    self.inner.resume_writing()

            def connection_lost(self, exc) -> None:
                self._disarm()
                if not self.admitted:
                    return
                limits.count -= 1
                if self.peer is not None and limits.open.get(self.peer) is self:
                    del limits.open[self.peer]
                self.inner.connection_lost(exc)

        return LimitedProtocol
