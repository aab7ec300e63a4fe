"""Micro-batching over a real server on a loopback socket: concurrent requests of one task share one forward
pass, get the scores they would get alone, and each keeps its own timeout, fallback and errors."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List

import httpx
import numpy as np
import pytest

from tests.serve.conftest import Wrapped, live

IDS = ["5", "1", "2", "3", "8", "13"]


def _body(user: str, **extra) -> dict:
    return {"environment": "home", "context": {"user": user}, "candidates": {"ids": IDS}, "top_k": 6, **extra}


def _overrides(window_ms: float, max_batch: int) -> List[str]:
    return ["serve=[home]", "serve.home.cache.size=0", "serve.home.threads=1", "serve.home.timeout_ms=10000",
            f"serve.home.batch_window_ms={window_ms}", f"serve.home.max_batch={max_batch}"]  # fmt: skip


def _post_all(url: str, bodies: List[dict]) -> List[dict]:
    """Every body at once, each on its own connection; the answers in order."""

    def post(body):
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/rank", json=body)
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(post, bodies))


def _spy(server, prepare=None, score_encoded=None):
    """The live scorer with ``prepare`` / ``score_encoded`` wrapped; returns the batch sizes scored."""
    holder = server.app.state.holder
    real = holder.scorer
    spy = Wrapped(real, real.score)
    sizes: List[int] = []

    def scored(requests):
        sizes.append(len(requests))
        return (score_encoded or real.score_encoded)(requests)

    spy.prepare = prepare or real.prepare
    spy.score_encoded = scored
    holder.scorer = spy
    return real, sizes


def test_concurrent_requests_share_one_forward_with_their_own_scores(registry: Path):
    users = ["7", "8", "9", "10"]
    with live(registry, _overrides(window_ms=5000, max_batch=4)) as server:
        real, sizes = _spy(server)
        answers = _post_all(server.url, [_body(u) for u in users])
    assert sizes == [4]  # the window is long: only the fourth request could start the batch
    for user, out in zip(users, answers):
        assert not out["degraded"]["degraded"]
        alone = dict(zip(IDS, real.score("home", {"user": user}, IDS)))
        got = {c["id"]: c["score"] for c in out["candidates"]}
        assert got.keys() == alone.keys()
        assert np.allclose([got[i] for i in IDS], [alone[i] for i in IDS], atol=1e-6, rtol=0)
        assert [c["score"] for c in out["candidates"]] == sorted(got.values(), reverse=True)


def test_each_request_keeps_its_own_timeout_and_fallback(registry: Path):
    def slow(requests):
        time.sleep(0.6)
        return real.score_encoded(requests)

    with live(registry, _overrides(window_ms=5000, max_batch=3)) as server:
        real, sizes = _spy(server, score_encoded=slow)
        quick_given = _body("7", timeout_ms=100.0, fallback="given_order")
        quick_popular = _body("8", timeout_ms=100.0)
        patient = _body("9", timeout_ms=5000.0)
        a, b, c = _post_all(server.url, [quick_given, quick_popular, patient])
    assert sizes == [3]
    assert a["degraded"]["reason"] == "timeout" and a["degraded"]["fallback"] == "given_order"
    assert [x["id"] for x in a["candidates"]] == IDS and a["candidates"][0]["score"] is None
    assert b["degraded"]["reason"] == "timeout" and b["degraded"]["fallback"] == "popularity"
    assert not c["degraded"]["degraded"]
    assert {x["id"]: x["score"] for x in c["candidates"]} == pytest.approx(
        dict(zip(IDS, real.score("home", {"user": "9"}, IDS))), abs=1e-6
    )


def test_requests_arriving_while_every_thread_is_busy_join_one_batch(registry: Path):
    def slow(requests):
        time.sleep(0.5)
        return real.score_encoded(requests)

    with live(registry, _overrides(window_ms=1, max_batch=8)) as server:  # one scoring thread
        real, sizes = _spy(server, score_encoded=slow)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post_all, server.url, [_body("7")])
            time.sleep(0.2)  # the first batch holds the only thread: the next three wait past their window
            rest = _post_all(server.url, [_body("8"), _body("9"), _body("10")])
            assert not first.result()[0]["degraded"]["degraded"]
    assert sizes == [1, 3]
    assert not any(a["degraded"]["degraded"] for a in rest)


def test_a_request_that_times_out_in_the_window_is_left_out_of_the_batch(registry: Path):
    with live(registry, _overrides(window_ms=800, max_batch=8)) as server:
        _, sizes = _spy(server)
        out = _post_all(server.url, [_body("7", timeout_ms=50.0)])[0]
        assert out["degraded"]["reason"] == "timeout"
        time.sleep(1.2)  # past the window: the batch ran, with nothing left to score
    assert sizes == []


def test_one_requests_error_fails_only_it_and_a_batch_error_fails_each_to_its_fallback(registry: Path):
    def prepare(task, context, ids):
        if context.get("user") == "666":
            raise RuntimeError("this request's featurization failed")
        return real.prepare(task, context, ids)

    with live(registry, _overrides(window_ms=5000, max_batch=3)) as server:
        real, sizes = _spy(server, prepare=prepare)
        bad, good, other = _post_all(server.url, [_body("666"), _body("7"), _body("8")])
        assert bad["degraded"]["reason"] == "error" and "featurization failed" in bad["degraded"]["detail"]
        assert not good["degraded"]["degraded"] and not other["degraded"]["degraded"]
        assert sizes == [2]

        def explode(requests):
            raise RuntimeError("the merged forward failed")

        _spy(server, score_encoded=explode)
        given = _body("7", fallback="given_order")
        answers = _post_all(server.url, [given, _body("8"), _body("9", fallback="popularity")])
    assert [a["degraded"]["reason"] for a in answers] == ["error"] * 3
    assert [a["degraded"]["fallback"] for a in answers] == ["given_order", "popularity", "popularity"]
    assert [x["id"] for x in answers[0]["candidates"]] == IDS


@pytest.mark.parametrize(
    "override, message",
    [
        ("serve.home.max_batch=0", "serve.home.max_batch must be > 0"),
        ("serve.home.batch_window_ms=-1", "serve.home.batch_window_ms must be >= 0"),
    ],
)
def test_bad_batching_knobs_fail_at_start_naming_the_key(registry: Path, override: str, message: str):
    from tests.serve.conftest import serve_config
    from unirec.serve.config import check

    with pytest.raises(ValueError, match=message):
        check(serve_config(registry, ["serve=[home]", override]))
