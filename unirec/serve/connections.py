"""Connection limits that uvicorn does not give: a deadline on reading each request, and a connection cap.

uvicorn arms its keep-alive timeout only after an answer, and any byte received cancels it. A connection
that sends nothing, or half a request head and then nothing (slowloris), is kept for ever, and its
``limit_concurrency`` is checked only once a request head is complete, so idle sockets never count against
it. Enough of them exhaust the process's file descriptors, and then every real request fails. Here:

- **read deadlines**: from its opening (or its previous answer, plus the keep-alive time) a connection has
  ``header_timeout_s`` to deliver a complete request head, then ``body_timeout_s`` for the body. Bytes that
  trickle in do not extend them. Past a deadline the connection is closed; a request the app is already
  answering is never cut.
- **head size**: a request head over ``max_head_bytes`` is answered 431 and the connection closed.
- **cap**: past ``max_connections`` open connections, a new one closes the oldest idle one (no request
  being answered), so idle sockets cannot lock real clients out; with none idle, the new one gets 503.

:func:`limited_protocol` subclasses uvicorn's own HTTP protocol (httptools or h11) with these; nothing
else of uvicorn changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_BIG = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits (see :class:`unirec.serve.config.ServerConfig` for their documentation)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    max_connections: int = 1000
    max_head_bytes: int = 65_536


def limited_protocol(http: str, limits: ConnectionLimits) -> type:
    """uvicorn's ``http`` protocol class ("httptools" or "h11") with the read deadlines, head size and cap."""
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base

    class Limited(_Limits, base):
        pass

    Limited.limits = limits
    Limited.__name__ = Limited.__qualname__ = f"Limited{base.__name__}"
    return Limited


class _Limits:
    """The mixin; ``limits`` is set on the class :func:`limited_protocol` builds."""

    limits: ConnectionLimits

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._opened = time.monotonic()
        self._head_bytes, self._reading_head = 0, True
        self._arm(self.limits.header_timeout_s)
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._reading_head and self._head_bytes > self.limits.max_head_bytes:
            self._refuse(_TOO_BIG)

    # httptools callbacks (h11: handle_events below)
    def on_headers_complete(self) -> None:
        self._head_read()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()  # the request is read: answering it is the app's time, not the client's

    def handle_events(self) -> None:
        import h11

        super().handle_events()
        state = self.conn.their_state
        if self._reading_head and state is h11.SEND_BODY:
            self._head_read()
        elif state in (h11.DONE, h11.MUST_CLOSE):
            self._reading_head = False
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._head_bytes, self._reading_head = 0, True
            self._arm(self.limits.keep_alive_s + self.limits.header_timeout_s)

    def _head_read(self) -> None:
        self._reading_head = False
        self._arm(self.limits.body_timeout_s)

    def _busy(self) -> bool:
        """A request is being answered on this connection."""
        return self.cycle is not None and not self.cycle.response_complete

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and not c._busy()]
        if not idle:
            return self._refuse(_BUSY)
        min(idle, key=lambda c: c._opened).transport.close()

    def _refuse(self, answer: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self._busy() or self._reading_head or not self._body_read():
            self.transport.close()

    def _body_read(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not getattr(cycle, "more_body", False)
