"""Schemathesis fuzzes the service's own OpenAPI schema against the real server on loopback.

Every operation gets schema-valid (positive) requests and ``POST /v1/rank`` also schema-breaking (negative)
ones, with a fixed budget and ``derandomize`` so a run is repeatable. Each answer must be a documented status
with a documented content type and a body that conforms to the schema; no 5xx but the one a caller can ask
for (``fallback: error`` answers 503, or 504 on timeout, with the degraded block); every 4xx names the
offending input in ``field``. The ``slow`` variant runs ten times as many examples.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serve.conftest import live

ENVIRONMENTS = ("home", "related", "search", "genre")
TOP_LEVEL = {"task", "environment", "context", "candidates", "seen", "top_k", "timeout_ms", "fallback"}
CHECKS = [response_schema_conformance, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def server(tmp_path_factory, artifact: Path):
    reg = tmp_path_factory.mktemp("registry-fuzz")
    shutil.copytree(artifact, reg / "v000001")
    with live(reg, [f"serve=[{','.join(ENVIRONMENTS)}]"]) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_fuzz_schema_no_5xx_conforming_answers_and_4xx_naming_the_field(server, api):
    statuses = fuzz(server, api, positive=150, negative=150)
    assert statuses[200] > 0, statuses  # valid requests did reach the scorer
    assert statuses[422] > 0, statuses


@pytest.mark.slow
def test_fuzz_schema_long(server, api):
    fuzz(server, api, positive=1500, negative=1500)


def fuzz(server, api, positive: int, negative: int) -> Counter:
    """Run every operation through the checks; answer how many of each status were seen."""
    statuses: Counter = Counter()
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/rank", "GET /v1/metadata", "GET /readyz"}
    for op in operations:
        has_input = op.body or op.query or op.path_parameters or op.headers
        runs = [(GenerationMode.POSITIVE, positive if has_input else 5)]
        if has_input:
            runs.append((GenerationMode.NEGATIVE, negative))
        for mode, n in runs:

            @settings(
                max_examples=n,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=server.url, timeout=30)
                statuses[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)
                assert_planned_server_error(case, response)
                assert_names_the_field(case, response)

            check()
    return statuses


def assert_planned_server_error(case, response) -> None:
    """A 5xx only where the caller (or the environment) chose ``fallback: error`` and scoring failed."""
    if response.status_code < 500:
        return
    body = response.json()
    degraded = body.get("degraded") or {}
    sent = case.body if isinstance(case.body, dict) else {}
    env = sent.get("environment") or sent.get("task")  # here each environment is named after its task
    default = {"search": "error"}  # conf/serve/search.yaml; the others fall back to a ranking
    chosen = sent.get("fallback") or default.get(env)
    expected = 504 if degraded.get("reason") == "timeout" else 503
    assert (
        response.status_code == expected
        and degraded.get("degraded") is True
        and degraded.get("fallback") == "error" == chosen
    ), f"server error {response.status_code} for {case.body!r}: {response.text[:500]}"


def assert_names_the_field(case, response) -> None:
    """A 4xx body says which input is wrong: ``field`` is a path into the request (or ``body``)."""
    if not 400 <= response.status_code < 500:
        return
    body = response.json()
    field = body.get("field")
    assert isinstance(field, str) and field, f"{response.status_code} names no field: {response.text[:500]}"
    assert field in body["message"], body
    sent = set(case.body) if isinstance(case.body, dict) else set()
    assert field == "body" or field.split(".")[0] in TOP_LEVEL | sent, (field, case.body)
