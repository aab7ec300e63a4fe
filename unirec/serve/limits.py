"""Request size limit as plain ASGI middleware: an oversized body is answered 413 before it is read.

A declared ``Content-Length`` over the limit is refused without reading a byte; a chunked body is counted as
it arrives and refused the moment it passes the limit, so memory stays bounded whatever a client sends.
The body is read here and replayed to the app in one message (FastAPI would turn an error raised from
inside its own body reading into a 400).
"""

from __future__ import annotations

import json
import math
from typing import Callable, Optional, Tuple


class BodyLimit:
    """Wraps an ASGI app; ``on_reject(reason)`` counts each refusal.

    Args:
        app: the wrapped ASGI app.
        max_bytes: largest accepted body.
        on_reject: called with "too_large" for each 413.
    """

    def __init__(self, app, max_bytes: int, on_reject: Callable[[str], None] = lambda reason: None):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._reject(send, declared)
        # read the body here, bounded, so the app never sees more than max_bytes
        body, seen = await read_body(receive, self.max_bytes)
        if seen > self.max_bytes:
            return await self._reject(send, seen)
        if body is None:
            return  # the client went away
        await self.app(scope, replay(body, receive), send)

    async def _reject(self, send, size: int) -> None:
        self.on_reject("too_large")
        body = json.dumps(
            {
                "message": f"body: {size} bytes or more exceeds the limit of {self.max_bytes} bytes",
                "field": "body",
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def read_body(receive, max_bytes: float = math.inf) -> Tuple[Optional[bytes], int]:
    """(the whole body, its size) from ASGI ``receive``; the body is None when the client went away or the
    size passed ``max_bytes`` (reading stops there, so the size is then only the part read)."""
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, seen
        chunks.append(message.get("body", b""))
        seen += len(chunks[-1])
        if seen > max_bytes:
            return None, seen
        if not message.get("more_body", False):
            return b"".join(chunks), seen


def replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` first, in one message, then what the client sends after it
    (disconnect notifications)."""
    sent = False

    async def receive_replayed():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_replayed


def _content_length(scope) -> int | None:
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None
