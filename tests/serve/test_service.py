"""POST /v1/rank over real HTTP on loopback: answers, validation, limits, status endpoints, metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import live

ALL = "serve=[home,related,search,genre]"


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifact: Path):
    import shutil

    reg = tmp_path_factory.mktemp("registry-service")
    shutil.copytree(artifact, reg / "v000001")
    with live(reg, [ALL, "serve.home.max_candidates=50", "server.max_body_bytes=65536"]) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def test_rank_answers_ranked_candidates_with_scores_version_and_environment(client):
    body = {
        "task": "home",
        "context": {"user": "7", "country": "us"},
        "candidates": {"ids": ["1", 2, "3", "4"]},
        "top_k": 3,
    }
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["environment"], out["task"], out["model_version"]) == ("home", "home", "v000001")
    assert out["degraded"] == {"degraded": False, "reason": None, "fallback": None, "detail": None}
    scores = [c["score"] for c in out["candidates"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert {c["id"] for c in out["candidates"]} <= {"1", 2, "3", "4"}  # ids come back as they were sent
    again = client.post("/v1/rank", json=body).json()
    assert again["cached"] is True and again["candidates"] == out["candidates"]


def test_environment_source_seen_and_ignored_fields(client):
    body = {
        "environment": "search",
        "context": {"query": "space comedy", "source_item": "5"},
        "candidates": {"source": "popular", "limit": 5},
    }
    out = client.post("/v1/rank", json=body).json()
    assert out["task"] == "search" and len(out["candidates"]) == 5
    assert out["ignored_context"] == ["source_item"]
    top = out["candidates"][0]["id"]
    # home excludes what the user has seen; the popular source refills to the limit
    home = {
        "task": "home",
        "context": {"user": "7"},
        "candidates": {"source": "popular", "limit": 5},
        "seen": [top],
    }
    ids = [c["id"] for c in client.post("/v1/rank", json=home).json()["candidates"]]
    assert top not in ids and len(ids) == 5


@pytest.mark.parametrize(
    "body, field",
    [
        ({"task": "home", "context": {"colour": "red"}, "candidates": {"ids": ["1"]}}, "context.colour"),
        ({"task": "home", "candidates": {"ids": ["1"]}, "tope_k": 3}, "tope_k"),
        ({"task": "notify", "candidates": {"ids": ["1"]}}, "task"),
        ({"task": "home", "candidates": {"ids": []}}, "candidates.ids"),
        ({"task": "home", "candidates": {"ids": ["1"]}, "top_k": 0}, "top_k"),
        ({"task": "home", "candidates": {"ids": [str(i) for i in range(51)]}}, "candidates.ids"),
        ({"task": "home", "candidates": {"source": "popular", "limit": 51}}, "candidates.limit"),
        ({"task": "home", "candidates": {"ids": ["1"], "type": "user"}}, "candidates.type"),
        ({"task": "home", "environment": "search", "candidates": {"ids": ["1"]}}, "task"),
        ({"candidates": {"ids": ["1"]}}, "environment"),
        ({"task": "home", "candidates": {"ids": ["1"]}, "timeout_ms": -1}, "timeout_ms"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(client, body, field):
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and field in r.json()["message"]


@pytest.fixture(scope="module")
def fastapi_client(tmp_path_factory, artifact: Path):
    """A second server of the same version and knobs, with the fast path (FastRank) taken out: every request
    goes through FastAPI's route."""
    import shutil

    from tests.serve.conftest import LiveServer, serve_config
    from unirec.serve.__main__ import uvicorn_options
    from unirec.serve.app import create_app
    from unirec.serve.fast_path import FastRank

    reg = tmp_path_factory.mktemp("registry-fastapi")
    shutil.copytree(artifact, reg / "v000001")
    cfg = serve_config(reg, [ALL, "serve.home.max_candidates=50", "server.max_body_bytes=65536"])
    app = create_app(cfg)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not FastRank]
    with LiveServer(app, uvicorn_options(cfg.server)) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        yield c


@pytest.mark.parametrize(
    "body",
    [
        {"task": "home", "context": {"user": "7", "country": "us"}, "candidates": {"ids": ["1", 2, "3"]}},
        {
            "environment": "genre",
            "context": {"genre": "comedy"},
            "candidates": {"source": "popular", "limit": 5},
        },
        {"task": "home", "context": {"colour": "red"}, "candidates": {"ids": ["1"]}},  # 422, names the field
        {"task": "home", "candidates": {"ids": []}},  # 422
        {"task": "home", "candidates": {"ids": ["1"] * 51}},  # over max_candidates: the handler's 422
    ],
)
def test_fast_path_answers_as_fastapi_does(client, fastapi_client, body):
    """The same JSON request to the server (fast path) and to one without the fast path (FastAPI's route):
    status, content type and body agree."""
    fast = client.post("/v1/rank", json=body)
    slow = fastapi_client.post("/v1/rank", json=body)
    assert fast.status_code == slow.status_code, (fast.text, slow.text)
    assert fast.headers["content-type"] == slow.headers["content-type"]
    assert fast.json() == slow.json()


def test_oversized_bodies_get_413_fast_and_memory_stays_flat(client):
    big = b'{"task": "home", "candidates": {"ids": [' + b'"123456",' * 20_000 + b'"1"]}}'
    rss = []
    start = time.perf_counter()
    for i in range(100):
        r = client.post("/v1/rank", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["field"] == "body"
        if i in (10, 99):
            rss.append(_rss_mb())
    assert (time.perf_counter() - start) / 100 < 0.5
    assert rss[1] - rss[0] < 20, rss  # 100 x 180 kB: a leak of the bodies would show


def test_chunked_oversized_body_is_refused_too(client):
    def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/v1/rank", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_health_readiness_metadata_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": "v000001"}
    meta = client.get("/v1/metadata").json()
    assert meta["model_version"] == "v000001" and meta["tasks"]["search"]["id"] == 2
    assert meta["environments"]["related"]["fallback"] == "given_order"
    schema = client.get("/openapi.json").json()
    assert "/v1/rank" in schema["paths"]
    assert set(schema["components"]["schemas"]["Context"]["properties"]) == set(meta["context"])


def test_prometheus_counters_add_up_to_the_requests_sent(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        before = _counters(c)
        sent = {"home": 3, "genre": 2}
        for env, n in sent.items():
            for i in range(n):
                body = {
                    "environment": env,
                    "context": {"user": str(100 + i)},
                    "candidates": {"ids": ["1", "2"]},
                }
                assert c.post("/v1/rank", json=body).status_code == 200
        bad = c.post("/v1/rank", json={"environment": "home", "candidates": {"ids": []}})
        assert bad.status_code == 422
        after = _counters(c)
    for env, n in sent.items():
        key = ("unirec_requests_total", (("environment", env), ("status", "200")))
        assert after.get(key, 0) - before.get(key, 0) == n
    key = ("unirec_requests_total", (("environment", "-"), ("status", "422")))
    assert after[key] - before.get(key, 0) == 1
    lat = ("unirec_request_latency_seconds_count", (("environment", "home"),))
    assert after[lat] - before.get(lat, 0) == sent["home"]
    assert after[("unirec_model_info", (("version", "v000001"),))] == 1


def _counters(client) -> dict:
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
