"""A slow, failing or NaN scorer gets the fallback, never a 500 or a NaN; overload gets 503 at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serve.conftest import Wrapped, live

TIMEOUT_MS = 60
BODY = {"environment": "home", "context": {"user": "7"}, "candidates": {"ids": ["5", "1", "2", "3"]}}


@pytest.fixture
def server(registry: Path):
    overrides = ["serve=[home,related]", f"serve.home.timeout_ms={TIMEOUT_MS}", "serve.home.cache.size=0",
                 "serve.related.cache.size=0", "serve.home.max_concurrent=3", "serve.home.threads=3"]  # fmt: skip
    with live(registry, overrides) as s:
        yield s


def _swap_score(server, score) -> None:
    holder = server.app.state.holder
    holder.scorer = Wrapped(holder.scorer, score)


def _slow(real, seconds: float):
    def score(*args):
        time.sleep(seconds)
        return real.score(*args)

    return score


def test_a_slow_scorer_gets_the_fallback_within_timeout_plus_25ms(server):
    real = server.app.state.holder.scorer
    _swap_score(server, _slow(real, 3 * TIMEOUT_MS / 1000))
    with httpx.Client(base_url=server.url, timeout=10) as c:
        c.get("/healthz")  # connection open: time the request, not the handshake
        for _ in range(3):
            start = time.perf_counter()
            r = c.post("/v1/rank", json=BODY)
            elapsed_ms = (time.perf_counter() - start) * 1000
            out = r.json()
            assert r.status_code == 200
            assert out["degraded"]["reason"] == "timeout" and out["degraded"]["fallback"] == "popularity"
            assert elapsed_ms <= TIMEOUT_MS + 25, elapsed_ms
            time.sleep(3 * TIMEOUT_MS / 1000)  # let the abandoned scoring thread finish
        shares = [x["score"] for x in out["candidates"]]
        assert shares == sorted(shares, reverse=True)
        assert shares == sorted(real.popularity("home", ["5", "1", "2", "3"]).tolist(), reverse=True)
        # a request may bring its own budget and fallback
        r = c.post("/v1/rank", json={**BODY, "timeout_ms": 20, "fallback": "given_order"}).json()
        assert r["degraded"]["reason"] == "timeout"
        assert [x["id"] for x in r["candidates"]] == ["5", "1", "2", "3"] and r["candidates"][0][
            "score"
        ] is None


def _raise(*args):
    raise RuntimeError("model exploded")


def _nan(task, context, ids):
    return np.full(len(ids), np.nan)


@pytest.mark.parametrize("score, reason", [(_raise, "error"), (_nan, "non_finite")])
@pytest.mark.parametrize("fallback, status", [("popularity", 200), ("given_order", 200), ("error", 503)])
def test_a_failing_or_nan_scorer_gets_the_fallback_never_a_500(server, score, reason, fallback, status):
    _swap_score(server, score)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        r = c.post("/v1/rank", json={**BODY, "fallback": fallback})
        assert r.status_code == status, r.text
        assert "NaN" not in r.text
        assert r.json()["degraded"]["reason"] == reason and r.json()["degraded"]["degraded"] is True
        metrics = c.get("/metrics").text
    assert f'unirec_degraded_total{{environment="home",reason="{reason}"}} 1.0' in metrics


def test_the_environment_fallback_applies_when_the_request_names_none(server):
    _swap_score(server, _raise)
    with httpx.Client(base_url=server.url, timeout=10) as c:
        out = c.post("/v1/rank", json={**BODY, "environment": "related"}).json()
    assert out["degraded"]["fallback"] == "given_order"  # conf/serve/related.yaml


def test_beyond_the_concurrency_limit_requests_get_503_with_retry_after_at_once(server):
    real = server.app.state.holder.scorer
    _swap_score(server, _slow(real, 0.5))
    body = {**BODY, "timeout_ms": 2000}
    barrier = threading.Barrier(8)

    def call(_):
        with httpx.Client(base_url=server.url, timeout=10) as c:
            c.get("/healthz")
            barrier.wait()
            start = time.perf_counter()
            r = c.post("/v1/rank", json=body)
            return r.status_code, r.headers.get("retry-after"), time.perf_counter() - start

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    assert len(ok) == 3 and len(busy) == 5, results
    assert all(r[1] == "1" for r in busy)
    assert max(r[2] for r in busy) < 0.25  # at once, not after the slow requests
