"""Connection-level limits uvicorn lacks: a time limit on the request head, a connection cap.

uvicorn closes a kept-alive connection that stays idle after an answer (`timeout_keep_alive`)
and bounds the request head's size (h11's 16 KiB), but a connection that never sends a complete
head - opened and left idle, or fed one byte a second (slowloris) - stays open for ever. This
protocol (uvicorn's h11 one, extended) gives each request head `header_timeout` seconds from the
connection's start or the previous answer's end, then answers 408 and closes, and answers 503
to a connection over `max_connections`. Both answers are OpenAI-format JSON. The body's time
limit is the route's (it reads the body; seechat/inference/serve/routes.py).
"""
from __future__ import annotations

import json
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from seechat.inference.serve.errors import error_body


def _raw_response(status: int, reason: str, message: str, code: str, extra: str = "") -> bytes:
    body = json.dumps(error_body(status, message, None, code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode() + body


def guarded_protocol(header_timeout: float, max_connections: int) -> type:
    """An `H11Protocol` subclass with these limits (uvicorn builds protocols from a class)."""
    slow = _raw_response(408, "Request Timeout", f"the request head did not arrive within {header_timeout:g} s",
                         "timeout")
    busy = _raw_response(503, "Service Unavailable", "too many open connections; retry shortly", "server_busy",
                         "retry-after: 1\r\n")

    class GuardedH11Protocol(H11Protocol):
        head_timer: Any = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.write(busy)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_too_slow(self) -> None:
            self.head_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(slow)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm()  # a head has begun (or the connection is new): it has header_timeout
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # uvicorn's keep-alive timer covers the idle time now
            self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
