"""The HTTP layer: a thin FastAPI app over the environments and the model holder.

Endpoints::

    POST /v1/rank       rank candidates for a task or environment (see unirec.serve.api)
    GET  /v1/metadata   model version, source run, tasks, context schema, environments and their knobs
    GET  /healthz       the process answers (liveness)
    GET  /readyz        a model is loaded and warmed up (readiness): 200, else 503
    GET  /metrics       Prometheus text format
    GET  /openapi.json  the schema (FastAPI)

A well-formed JSON rank request is answered by :class:`FastRank` before FastAPI's routing and middleware
stack (the same request model and handler); every other request, bad ones included, goes through FastAPI as
before. The body limit stands in front of both.

Every rank answer is counted by environment and status, every fallback by reason. Bad input is a 4xx whose
``field`` names the input; nothing the scorer does becomes a 500, and a 500 from anything else is counted
as a 500. No answer names a path of this machine (the source run is named by its directory's name).
"""

import dataclasses
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Dict, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from unirec.serve.api import STRICT_JSON, ErrorResponse, RankResponse, rank_request_model
from unirec.serve.config import ServeConfig, check
from unirec.serve.environments import Answer, Environment
from unirec.serve.fast_path import FastRank
from unirec.serve.limits import BodyLimit
from unirec.serve.metrics import ServeMetrics
from unirec.serve.registry import ModelHolder
from unirec.serve.scorer import RequestError, Scorer

UNKNOWN_ENV = "-"
log = logging.getLogger("unirec.serve")
# The directories of an absolute path inside a message (a file's own name is kept: it says which file).
_ABSOLUTE_DIRS = re.compile(r"(?<![\w.~:/-])/(?:[^\s'\"/:,;()\[\]{}]+/)+")


def create_app(cfg: ServeConfig, holder: Optional[ModelHolder] = None) -> FastAPI:
    """Load the model (the request schema is built from its feature spec), then wire the routes."""
    check(cfg)
    metrics = ServeMetrics()
    holder = holder or ModelHolder(
        cfg.server.registry, cfg.server.version, metrics.serving, _refused(metrics)
    )
    scorer = holder.scorer or holder.load_initial()
    holder.compatible = _same_schema(scorer)
    envs = {name: Environment(name, env) for name, env in cfg.serve.items()}
    for name, env in cfg.serve.items():
        if env.task not in scorer.spec.tasks:
            raise ValueError(
                f"serve.{name}.task={env.task!r} is not a task of the model; known: {list(scorer.spec.tasks)}"
            )
    max_candidates = max(e.max_candidates for e in cfg.serve.values())
    RankRequest = rank_request_model(scorer.spec, list(envs), max_candidates)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for env in envs.values():
            env.warm_up(holder.scorer)
        holder.start(cfg.server.freshness_s)
        yield
        holder.stop()
        for env in envs.values():
            env.close()

    def front(stack):
        # The fast path inside the body limit (it only ever sees a bounded body), both in front of the
        # whole middleware stack.
        fast = FastRank(stack, model=RankRequest, rank=lambda req: _rank(req, holder, envs, metrics))
        return BodyLimit(fast, max_bytes=cfg.server.max_body_bytes, on_reject=_rejected(metrics))

    app = _Service(front, title="unirec ranking service", version="1", lifespan=lifespan)
    app.router.route_class = _OrjsonRoute
    app.state.holder, app.state.metrics, app.state.environments = holder, metrics, envs
    app.add_exception_handler(RequestValidationError, _invalid(metrics))
    app.add_exception_handler(HTTPException, _http_error(metrics))
    errors = {c: {"model": ErrorResponse} for c in (400, 413, 422, 503, 504)}

    @app.post("/v1/rank", response_model=RankResponse, responses=errors)
    async def rank(body: RankRequest) -> Response:  # type: ignore[valid-type]
        return await _rank(body, holder, envs, metrics)

    _add_status_routes(app, cfg, holder, metrics)
    return app


class _Service(FastAPI):
    """FastAPI with ``front`` (the body limit and :class:`FastRank`) wrapped around its whole middleware
    stack rather than inside it: a fast-path request skips Starlette's error middleware and FastAPI's own
    layers, each of which wraps every ``send``. Nothing is lost by it: the fast path answers its own errors
    (``_rank`` turns any exception into a counted 500), and uvicorn answers 500 for anything that escapes."""

    def __init__(self, front: Callable, **kwargs):
        self._front = front
        super().__init__(**kwargs)

    def build_middleware_stack(self):
        return self._front(super().build_middleware_stack())


class _OrjsonRequest(Request):
    """A request whose JSON body is parsed by orjson: 1 MB parses in about 10 ms on the event loop, where
    the standard library takes 35 ms, and every other request waits meanwhile."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
                STRICT_JSON.set(True)
            except orjson.JSONDecodeError:
                # The standard library's leniency and errors, as before: NaN, huge integers and lone
                # surrogates parse, for the request model to refuse naming the field.
                STRICT_JSON.set(False)
                self._json = json.loads(body)
        return self._json


class _OrjsonRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return route


async def _rank(req, holder: ModelHolder, envs: Dict[str, Environment], metrics: ServeMetrics) -> Response:
    start = time.perf_counter()
    try:
        env, task = _resolve(req, envs)
    except RequestError as e:
        metrics.requests.labels(UNKNOWN_ENV, "422").inc()
        return _error(422, str(e), e.field)
    status = 500  # until an answer is made: an unexpected error is counted as what the client gets
    try:
        env.admit()
    except Exception as e:  # Overloaded: 503 at once, no queueing
        metrics.rejected.labels(env.name, "overloaded").inc()
        metrics.requests.labels(env.name, "503").inc()
        return _error(503, str(e), None, {"Retry-After": str(env.cfg.retry_after_s)})
    try:
        scorer = holder.scorer
        answer = await env.rank(scorer, task, req)
        if answer.reason:
            metrics.degraded.labels(env.name, answer.reason).inc()
        if answer.reason is None:
            metrics.cache.labels(env.name, "hit" if answer.cached else "miss").inc()
        response = _answer(env, task, scorer, answer)
        status = response.status_code
        return response
    except RequestError as e:
        status = 422
        return _error(422, str(e), e.field)
    except Exception:  # noqa: BLE001 - logged; the client gets our 500 body, /metrics counts a 500
        log.exception("environment %s: answering failed", env.name)
        return _error(500, "internal error while answering; see the service log", None)
    finally:
        env.release()
        metrics.requests.labels(env.name, str(status)).inc()
        metrics.latency.labels(env.name).observe(time.perf_counter() - start)


def _resolve(req, envs: Dict[str, Environment]):
    """(environment, task) from whichever the request names; both named must agree."""
    if req.environment is not None:
        env = envs[req.environment]
        if req.task is not None and req.task != env.cfg.task:
            raise RequestError(
                "task", f"{req.task!r} is not the task of environment {env.name!r} ({env.cfg.task})"
            )
        return env, env.cfg.task
    if req.task is not None:
        for env in envs.values():
            if env.cfg.task == req.task:
                return env, req.task
        raise RequestError(
            "task",
            f"no environment here serves task {req.task!r}; served: {[e.cfg.task for e in envs.values()]}",
        )
    if len(envs) == 1:
        env = next(iter(envs.values()))
        return env, env.cfg.task
    raise RequestError("environment", f"name an environment or a task; hosted here: {list(envs)}")


def _answer(env: Environment, task: str, scorer: Scorer, a: Answer) -> Response:
    degraded = {
        "degraded": a.reason is not None,
        "reason": a.reason,
        "fallback": a.fallback,
        "detail": public(a.detail),
    }
    if a.fallback is not None:
        degraded["fallback"] = a.fallback.value
    if a.reason is not None and a.fallback is not None and a.fallback.value == "error":
        code = 504 if a.reason == "timeout" else 503
        return _error(
            code, f"scoring failed ({a.reason}) and environment fallback is error", None, degraded=degraded
        )
    head = {
        "environment": env.name,
        "task": task,
        "model_version": scorer.version,
        "degraded": degraded,
        "cached": a.cached,
        "ignored_context": a.ignored,
    }
    body = orjson.dumps(head)[:-1] + b',"candidates":' + candidates_json(a.ids, a.ctype, a.scores) + b"}"
    return Response(body, media_type="application/json")


def candidates_json(ids: list, ctype: str, scores) -> bytes:
    """``[{"id": ..., "type": ..., "score": ...}, ...]`` written from the columns, with no Python dict per
    candidate: orjson writes all ids and all scores (a list, or a float64 array without a Python float per
    score) at once, and one join interleaves their items; the bytes are those of ``orjson.dumps`` of the
    dicts. Scores are finite here (environments turn non-finite ones into a fallback); a stray NaN is written
    as null, never as the invalid JSON token NaN.

    >>> candidates_json(["a", 7], "item", [0.5, None])
    b'[{"id":"a","type":"item","score":0.5},{"id":7,"type":"item","score":null}]'
    """
    if not len(ids):
        return b"[]"
    # Numbers and null hold no comma, so the scores' array splits into its items safely.
    score_items = orjson.dumps(scores, option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    typed = b',"type":' + orjson.dumps(ctype) + b',"score":'
    written = orjson.dumps(ids)
    if written.startswith(b'["') and written.endswith(b'"]'):
        # Text ids: the array splits at its '","' boundaries, a sequence no encoded string holds (a quote
        # inside one is escaped); fewer pieces than ids means some id is a number, written one by one below.
        inner = written[2:-2].split(b'","')
        if len(inner) == len(ids):
            return _interleaved(b'[{"id":"', inner, b'"' + typed, score_items, b'},{"id":"')
    return _interleaved(b'[{"id":', list(map(orjson.dumps, ids)), typed, score_items, b'},{"id":')


def _interleaved(start: bytes, ids: list, between: bytes, scores: list, after: bytes) -> bytes:
    """``start id0 between s0 after id1 between s1 ... }]`` in one join over a list filled by slices (no
    tuple or join per candidate)."""
    parts = [after, None, between, None] * len(ids)
    parts[0] = start
    parts[1::4] = ids
    parts[3::4] = scores
    parts.append(b"}]")
    return b"".join(parts)


def _error(
    code: int, message: str, field: Optional[str], headers=None, degraded=None, detail=None
) -> Response:
    body = {"message": message, "field": field, "detail": detail, "degraded": degraded}
    return JSONResponse(body, status_code=code, headers=headers)


def _invalid(metrics: ServeMetrics):
    async def handler(request: Request, exc: RequestValidationError) -> Response:
        errs = exc.errors()
        body = getattr(exc, "body", None)
        # A check over the whole request (the Unicode one) names its field in the error's context.
        detail = [
            {
                "field": (e.get("ctx") or {}).get("field") or _field(e, body),
                "msg": e["msg"],
                "type": e["type"],
            }
            for e in errs[:20]
        ]
        first = detail[0] if detail else {"field": "body", "msg": "invalid request"}
        metrics.requests.labels(UNKNOWN_ENV, "422").inc()
        return _error(422, f"{first['field']}: {first['msg']}", first["field"], detail=detail)

    return handler


def _http_error(metrics: ServeMetrics):
    """Errors raised by the framework itself, in the same body as ours: a body that is not UTF-8 JSON is
    FastAPI's 400 (``field="body"``), an unknown path 404 (``field="path"``), a wrong method 405."""
    fields = {400: "body", 404: "path", 405: "method"}

    async def handler(request: Request, exc: HTTPException) -> Response:
        if request.url.path == "/v1/rank":
            metrics.requests.labels(UNKNOWN_ENV, str(exc.status_code)).inc()
        field = fields.get(exc.status_code)
        message = f"{field}: {exc.detail}" if field else str(exc.detail)
        return _error(exc.status_code, message, field, headers=getattr(exc, "headers", None))

    return handler


def _field(error, body) -> str:
    """The input an error is about, as a dotted path into the body: ``context.colour``, ``candidates.ids.3``.

    pydantic's location also names union branches (``ExplicitCandidates``, and ``str``/``int`` after a
    scalar that is neither); following the location through the body as sent leaves them out.
    """
    if error.get("type") == "json_invalid":
        return "body"
    parts, node = [], body
    for p in error["loc"]:
        if p == "body" or (isinstance(p, str) and p.endswith("Candidates")):
            continue
        if parts and not isinstance(node, (dict, list)):
            break  # past a scalar (or a missing field): the rest names union branches, not input
        parts.append(str(p))
        if isinstance(node, dict):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and -len(node) <= p < len(node):
            node = node[p]
        else:
            node = None
    return ".".join(parts) or "body"


def _rejected(metrics: ServeMetrics):
    def count(reason: str) -> None:
        metrics.rejected.labels(UNKNOWN_ENV, reason).inc()
        metrics.requests.labels(UNKNOWN_ENV, "413").inc()

    return count


def _refused(metrics: ServeMetrics):
    return lambda version, reason: metrics.refused.labels(version).inc()


def _same_schema(first: Scorer):
    """The request model is built from the first artifact's schema: a new version must keep it."""
    fields = {k: f.kind for k, f in first.spec.context.items()}
    tasks = {k: t.candidate for k, t in first.spec.tasks.items()}

    def check_(new: Scorer) -> Optional[str]:
        if {k: f.kind for k, f in new.spec.context.items()} != fields or {
            k: t.candidate for k, t in new.spec.tasks.items()
        } != tasks:
            return "its context fields or tasks differ from the API in service; restart the service to adopt them"
        return None

    return check_


def _add_status_routes(app: FastAPI, cfg: ServeConfig, holder: ModelHolder, metrics: ServeMetrics) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Response:
        if holder.scorer is None:
            return _error(503, "no model loaded", None)
        return JSONResponse({"status": "ready", "model_version": holder.version})

    @app.get("/v1/metadata")
    async def metadata() -> dict:
        s = holder.scorer
        m = s.artifact.manifest if s else {}
        return {
            "model_version": holder.version,
            "source": _public_source(m.get("source")),
            "created_unix": m.get("created_unix"),
            "tasks": {
                k: {"id": t.id, "candidate": t.candidate, "context": list(t.fields)}
                for k, t in s.spec.tasks.items()
            },
            "context": {k: f.kind for k, f in s.spec.context.items()},
            "environments": {k: _plain(dataclasses.asdict(v)) for k, v in cfg.serve.items()},
            "refused_versions": {v: public(reason) for v, reason in holder.refused.items()},
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def public(message: Optional[str]) -> Optional[str]:
    """A message fit to answer: the directories of any absolute path left out.

    >>> public("cannot read /srv/models/v000002/model.safetensors: truncated")
    'cannot read model.safetensors: truncated'
    """
    return None if message is None else _ABSOLUTE_DIRS.sub("", message)


def _public_source(source) -> Optional[dict]:
    """The source run by its directory's name, never by where it lies on the training machine."""
    if not isinstance(source, dict):
        return None
    out = {k: v for k, v in source.items() if k != "run_dir"}
    if isinstance(source.get("run_dir"), str):
        out["run"] = Path(source["run_dir"]).name
    return out


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return getattr(obj, "value", obj)
