"""Hostile requests over real HTTP: bounded before any work, strict, valid Unicode, counted as answered,
ids normalised alike everywhere, memory bounded in bytes, and no path of this machine in any answer."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.serve.conftest import Wrapped, live
from unirec.serve.api import MAX_ID_LEN

HOME = {"environment": "home", "context": {"user": "7"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifact: Path):
    reg = tmp_path_factory.mktemp("registry-hostile")
    shutil.copytree(artifact, reg / "v000001")
    with live(reg, ["serve=[home,related]", "serve.home.cache.size=0"]) as s:
        yield s


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def _post_raw(client, text: str) -> httpx.Response:
    return client.post("/v1/rank", content=text.encode(), headers={"content-type": "application/json"})


def test_200000_bad_ids_are_one_error_on_the_lists_length(client):
    body = json.dumps({**HOME, "candidates": {"ids": [1.5] * 200_000}})
    assert len(body) < 1_048_576  # under the body limit: the request model must refuse it
    r = _post_raw(client, body)
    assert r.status_code == 422
    out = r.json()
    assert out["field"] == "candidates.ids" and out["detail"][0]["type"] == "too_long", out["detail"][:3]
    # refused on its length: not one error per item
    assert len(out["detail"]) == 1, out["detail"][:3]


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"top_k": True}, "top_k"),
        ({"top_k": "3"}, "top_k"),
        ({"timeout_ms": True}, "timeout_ms"),
        ({"timeout_ms": "50"}, "timeout_ms"),
        ({"candidates": {"source": "popular", "limit": True}}, "candidates.limit"),
        ({"candidates": {"source": "popular", "limit": "3"}}, "candidates.limit"),
    ],
)
def test_numbers_are_strict_no_booleans_or_strings(client, extra, field):
    r = client.post("/v1/rank", json={**HOME, "candidates": {"ids": ["1", "2"]}, **extra})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field


@pytest.mark.parametrize(
    "body, field",
    [
        ({**HOME, "candidates": {"ids": ["x" * (MAX_ID_LEN + 1)]}}, "candidates.ids.0"),
        ({**HOME, "candidates": {"ids": ["1"]}, "seen": ["2", "x" * (MAX_ID_LEN + 1)]}, "seen.1"),
        # context values are bounded by their kind (unirec.kinds.RequestLimits), before any featurization
        ({**HOME, "context": {"user": "u" * 900_000}, "candidates": {"ids": ["1"]}}, "context.user"),
        (
            {**HOME, "context": {"history": ["1", "y" * (MAX_ID_LEN + 1)]}, "candidates": {"ids": ["1"]}},
            "context.history.1",
        ),  # fmt: skip
    ],
)
def test_an_overlong_id_is_refused_naming_it(client, body, field):
    r = client.post("/v1/rank", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert (
        client.post("/v1/rank", json={**HOME, "candidates": {"ids": ["x" * MAX_ID_LEN]}}).status_code == 200
    )


def _rank_count(client, env: str, status: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'unirec_requests_total{{environment="{env}",status="{status}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(
    "text, field",
    [
        ('{"environment": "home", "candidates": {"ids": ["1", "\\ud800"]}}', "candidates.ids.1"),
        ('{"environment": "home", "context": {"user": "a\\udfff"}, "candidates": {"ids": ["1"]}}',
         "context.user"),
        ('{"environment": "home", "candidates": {"ids": ["1"]}, "seen": ["\\ud800x"]}', "seen.0"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_422_naming_the_field_and_counted_so(client, text, field):
    before = {s: _rank_count(client, e, s) for e, s in [("-", "422"), ("home", "200"), ("home", "500")]}
    r = _post_raw(client, text)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field
    assert _rank_count(client, "-", "422") == before["422"] + 1
    assert _rank_count(client, "home", "200") == before["200"]
    assert _rank_count(client, "home", "500") == before["500"]


@pytest.mark.parametrize(
    "body",
    [b'["\\ud800"]', b'["\\udfff"]', b'["\\udc00\\ud800"]', b'["x\\ud800y"]', b'["\xed\xa0\x80"]'],
)
def test_orjson_refuses_every_lone_surrogate_so_its_bodies_skip_the_walk(body):
    """STRICT_JSON skips the request model's Unicode walk for bodies orjson parsed: sound only while orjson
    refuses each of these (escaped high, low, reversed pair, inside text, raw UTF-8 bytes of one)."""
    import orjson

    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    assert orjson.loads('["\\ud83d\\ude00"]') == ["\U0001f600"]  # a real pair is fine


def test_an_answer_that_fails_to_be_written_is_counted_as_the_500_it_is(server, client):
    holder = server.app.state.holder
    real = holder.scorer
    broken = Wrapped(real, real.score)
    broken.version = object()  # orjson cannot write it: the answer fails after scoring
    holder.scorer = broken
    try:
        before = _rank_count(client, "home", "500"), _rank_count(client, "home", "200")
        r = client.post("/v1/rank", json={**HOME, "candidates": {"ids": ["1", "2"]}})
        after = _rank_count(client, "home", "500"), _rank_count(client, "home", "200")
    finally:
        holder.scorer = real
    assert r.status_code == 500 and r.json()["message"].startswith("internal error")
    assert after == (before[0] + 1, before[1])


def test_seen_and_the_popularity_fallback_use_the_scorers_id_normalisation(server, client):
    real = server.app.state.holder.scorer
    top = str(real.popular("home", 1)[0])
    body = {**HOME, "candidates": {"ids": [top, "1", "2"]}, "seen": [f"0{top}"]}
    ids = [c["id"] for c in client.post("/v1/rank", json=body).json()["candidates"]]
    assert top not in ids and len(ids) == 2

    def fail(*args):
        raise RuntimeError("model exploded")

    server.app.state.holder.scorer = Wrapped(real, fail)
    try:
        body = {**HOME, "candidates": {"ids": ["999999", f"00{top}"]}, "fallback": "popularity"}
        out = client.post("/v1/rank", json=body).json()
    finally:
        server.app.state.holder.scorer = real
    assert out["degraded"]["reason"] == "error"
    assert out["candidates"][0] == {
        "id": f"00{top}",
        "type": "item",
        "score": real.popularity("home", [top])[0],
    }
    assert out["candidates"][0]["score"] > 0


def test_the_score_cache_is_bounded_in_bytes(registry: Path):
    limit = 300_000
    overrides = ["serve=home", "serve.home.cache.size=1000", f"serve.home.cache.max_bytes={limit}"]
    with live(registry, overrides) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        cache = server.app.state.environments["home"].cache
        for n in range(30):
            ids = [f"{n}-{i}-".ljust(MAX_ID_LEN, "x") for i in range(200)]  # ~60 kB of key each
            r = c.post("/v1/rank", json={**HOME, "candidates": {"ids": ids}, "timeout_ms": 10_000})
            assert r.status_code == 200 and r.json()["degraded"]["degraded"] is False
            assert cache.nbytes <= limit
        assert 0 < len(cache) < 10


def test_no_endpoint_names_a_path_of_this_machine(registry: Path, toy_run: Path, tmp_path: Path):
    corrupt = registry / "v000002"
    shutil.copytree(registry / "v000001", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\0" * 16)
    places = {str(p) for p in (tmp_path, toy_run, registry.resolve(), ROOT, Path(sys.prefix), Path.home())}
    with live(registry, ["serve=home", "server.freshness_s=0"]) as server:
        real = server.app.state.holder.scorer

        def fail(*args):
            raise OSError(f"cannot read {toy_run / 'checkpoints' / 'state.pt'}")

        with httpx.Client(base_url=server.url, timeout=30) as c:
            answers = [c.get(p) for p in ("/healthz", "/readyz", "/v1/metadata", "/metrics", "/openapi.json")]
            answers += [c.get("/nowhere"), c.post("/v1/rank", json={**HOME, "candidates": {"ids": ["1"]}})]
            answers += [
                c.post("/v1/rank", json={**HOME, "context": {"colour": 1}, "candidates": {"ids": ["1"]}})
            ]
            server.app.state.holder.scorer = Wrapped(real, fail)
            degraded = c.post("/v1/rank", json={**HOME, "candidates": {"ids": ["2", "3"]}})
            answers.append(degraded)
    meta = answers[2].json()
    assert "v000002" in meta["refused_versions"] and meta["source"]["run"] == toy_run.name
    assert "state.pt" in degraded.json()["degraded"]["detail"]
    for r in answers:
        text = r.text + json.dumps(dict(r.headers))
        leaked = [p for p in places if p in text or p.replace(os.sep, "\\/") in text]
        assert not leaked, (r.url, leaked)
