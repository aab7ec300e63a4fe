"""FastRank (unirec.serve.fast_path), the ASGI fast path of POST /v1/rank, against a stand-in app: what it answers itself and what
it hands to the app behind it, byte for byte."""

from __future__ import annotations

import asyncio

from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from unirec.serve.fast_path import FastRank


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int


def drive(body: bytes, content_type: bytes | None = b"application/json", path: str = "/v1/rank"):
    """(what the stand-in app received or None, the handler's requests, the messages sent)."""
    seen, handled, sent = [], [], []

    async def app(scope, receive, send):
        parts, more = [], True
        while more:
            message = await receive()
            parts.append(message["body"])
            more = message["more_body"]
        seen.append(b"".join(parts))
        await Response(b"behind", status_code=422)(scope, receive, send)

    async def rank(req):
        handled.append(req)
        return Response(b'{"ok":true}', media_type="application/json")

    chunks = [body[: len(body) // 2], body[len(body) // 2 :]]  # two messages: the path joins them

    async def receive():
        part = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": part, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", content_type)] if content_type else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    asyncio.run(FastRank(app, Request, rank)(scope, receive, send))
    return (seen[0] if seen else None), handled, sent


def test_a_valid_request_is_answered_without_the_app_behind():
    seen, handled, sent = drive(b'{"n": 3}')
    assert seen is None and handled == [Request(n=3)]
    assert sent[0]["status"] == 200 and sent[1]["body"] == b'{"ok":true}'


def test_everything_else_reaches_the_app_behind_with_its_body_intact():
    for body, ctype, path in [
        (b'{"n": "x"}', b"application/json", "/v1/rank"),  # the model refuses it
        (b'{"n": 3, "m": 1}', b"application/json; charset=utf-8", "/v1/rank"),  # extra field
        (b'{"n": NaN}', b"application/json", "/v1/rank"),  # orjson refuses it
        (b'{"n": 3}', b"text/plain", "/v1/rank"),  # another content type
        (b'{"n": 3}', None, "/v1/rank"),  # no content type
        (b'{"n": 3}', b"application/json", "/v1/other"),  # another path
    ]:
        seen, handled, sent = drive(body, ctype, path)
        assert seen == body and handled == [], (body, ctype, path)
        assert sent[0]["status"] == 422 and sent[1]["body"] == b"behind"


def test_content_type_parameters_and_case_still_take_the_fast_path():
    _, handled, _ = drive(b'{"n": 1}', b"Application/JSON; charset=utf-8")
    assert handled == [Request(n=1)]
