"""The fast path of ``POST /v1/rank``: a well-formed JSON request answered before FastAPI's routing.

:func:`unirec.serve.app.create_app` puts :class:`FastRank` just inside the body limit, both in front of
FastAPI's whole middleware stack; requests it does not take go to that stack unchanged.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import orjson
from fastapi.responses import Response
from pydantic import ValidationError

from unirec.serve.api import STRICT_JSON
from unirec.serve.limits import read_body, replay


class FastRank:
    """``POST /v1/rank`` of a well-formed JSON request answered without FastAPI's request machinery.

    The body is parsed by orjson and validated by the same request model; a valid request goes straight
    to the handler FastAPI would call (``unirec.serve.app._rank``), and its response is sent as FastAPI
    would send it. Any body this path does not accept as it is (another content type, JSON orjson refuses,
    a request the model refuses) is replayed to the FastAPI app untouched, which answers it exactly as
    before: the same 4xx bodies, fields and counts. At 1000 candidates FastAPI's request handling,
    dependency solving and middleware stack were 0.8 of the 1.5 ms of event-loop time per request under
    cProfile (``BENCHMARKS.md``, "Serving").

    Args:
        app: the FastAPI app (and its middleware) behind.
        model: the request model (:func:`unirec.serve.api.rank_request_model`).
        rank: the handler: a validated request -> its response.
    """

    def __init__(self, app, model, rank: Callable[[object], Awaitable[Response]]):
        self.app, self.model, self.rank = app, model, rank

    async def __call__(self, scope, receive, send):
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1/rank"
            and _json_content(scope)
        ):
            return await self.app(scope, receive, send)
        body, _ = await read_body(receive)
        if body is None:
            return  # the client went away
        try:
            data = orjson.loads(body)
            STRICT_JSON.set(True)
            req = self.model.model_validate(data)
        except (orjson.JSONDecodeError, ValidationError):
            return await self.app(scope, replay(body, receive), send)
        response = await self.rank(req)
        await response(scope, receive, send)


def _json_content(scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-type":
            return v.split(b";", 1)[0].strip().lower() == b"application/json"
    return False
