"""Serving with the user's history: scorer parity for every pooling, and the request/snapshot/merge knob."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_train
from tests.serve.conftest import assert_scores_match_forward, live
from unirec.export import export
from unirec.model.pooling import SEQUENCE_POOLINGS
from unirec.serve.scorer import Scorer


@pytest.fixture(scope="session")
def history_artifacts(tmp_path_factory, toy_cfg) -> dict:
    """pooling -> (run directory, exported artifact): toy runs trained with data.history, one per pooling."""
    out = {}
    for pooling in SEQUENCE_POOLINGS:
        run = tmp_path_factory.mktemp(f"history-{pooling}")
        r = run_train(["debug=toy", f"data.cache_dir={toy_cfg.data.cache_dir}", f"hydra.run.dir={run}",
                       "data.history.enabled=true", "data.history.max_len=8", f"model.sequence_pooling={pooling}",
                       "trainer.max_steps=12", "trainer.eval_every=12", "trainer.checkpoint_every=12"], cwd=run)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        out[pooling] = (run, export(run, tmp_path_factory.mktemp(f"registry-{pooling}")))
    return out


@pytest.mark.parametrize("pooling", list(SEQUENCE_POOLINGS))
def test_scores_with_a_history_equal_the_training_forward(history_artifacts, pooling):
    run, artifact = history_artifacts[pooling]
    scorer = Scorer.load(artifact)
    features = Path(json.loads((run / "metrics.json").read_text())["features"])
    raw = pq.read_table(features.parent / "labeled" / "split=valid" / "task=home")
    req, hist = raw["request_id"].to_numpy(), raw["history"].to_pylist()
    # most of the requests checked below carry a history
    assert sum(bool(hist[int(np.nonzero(req == r)[0][0])]) for r in np.unique(req)[:30]) > 20
    assert assert_scores_match_forward(scorer, features, "home", requests=30) > 100


def _rank(server, context, env="home"):
    body = {"environment": env, "context": context, "candidates": {"ids": [str(i) for i in range(1, 41)]},
            "top_k": 40}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/rank", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return {c["id"]: c["score"] for c in r.json()["candidates"]}


def test_the_service_ranks_with_a_history_from_the_request_or_the_snapshot(history_artifacts, tmp_path):
    import shutil

    _, artifact = history_artifacts["attention"]
    registry = tmp_path / "registry"
    shutil.copytree(artifact, registry / "v000001")
    snapshot = pq.read_table(artifact / "history.parquet").to_pylist()
    user, hist = next((r["user"], r["history"]) for r in snapshot if len(r["history"]) >= 3)
    scorer = Scorer.load(artifact)
    ids = [str(i) for i in range(1, 41)]
    want = dict(zip(ids, scorer.score("home", {"user": user, "history": hist}, ids)))
    bare = dict(zip(ids, scorer.score("home", {"user": user}, ids)))
    assert max(abs(want[i] - bare[i]) for i in ids) > 1e-4  # the history does move the scores

    with live(registry, ["serve=[home]", "serve.home.cache.size=0"]) as server:
        sent = _rank(server, {"user": user, "history": hist})
        assert sent == pytest.approx(want, abs=1e-6)
        assert _rank(server, {"user": user}) == pytest.approx(bare, abs=1e-6)
        bad = httpx.post(
            f"{server.url}/v1/rank", json={"context": {"history": "12"}, "candidates": {"ids": ["1"]}}
        )
        assert bad.status_code == 422 and "history" in bad.text
    with live(registry, ["serve=[home]", "serve.home.cache.size=0", "serve.home.history=snapshot"]) as server:
        assert _rank(server, {"user": user}) == pytest.approx(want, abs=1e-6)
        assert _rank(server, {"user": user, "history": ["1", "2"]}) == pytest.approx(want, abs=1e-6)
    with live(registry, ["serve=[home]", "serve.home.cache.size=0", "serve.home.history=merge"]) as server:
        merged = dict(zip(ids, scorer.score("home", {"user": user, "history": [*hist, "5"]}, ids)))
        assert _rank(server, {"user": user, "history": ["5"]}) == pytest.approx(merged, abs=1e-6)


def test_the_snapshot_is_listed_and_hashed_in_the_manifest(history_artifacts):
    _, artifact = history_artifacts["mean"]
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert "history.parquet" in manifest["files"]
