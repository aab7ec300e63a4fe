"""The scorer: the training-time forward's scores, from raw request fields, through the same Featurizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.serve.conftest import assert_scores_match_forward
from unirec.serve.scorer import RequestError, Scorer


@pytest.fixture(scope="module")
def scorer(artifact: Path) -> Scorer:
    return Scorer.load(artifact)


@pytest.mark.parametrize("task", ["home", "related", "search", "genre", "genre_rows"])
def test_scores_equal_the_training_forward_on_the_same_rows(scorer: Scorer, toy_run: Path, task: str):
    """Raw valid rows, one request at a time through the scorer == MultiTaskRanker.forward on their shard."""
    features = Path(json.loads((toy_run / "metrics.json").read_text())["features"])
    checked = assert_scores_match_forward(scorer, features, task, requests=40)
    assert checked > 100


def test_ids_outside_the_catalogue_score_as_the_full_forward_does(scorer: Scorer):
    ids = ["1", "2", "not-an-item", "3", "424242"]
    ctx, present, task_type = scorer.context_tensors("home", {"user": "7", "country": "us"})
    cand = scorer._candidate_tensors("item", pa.array(ids))
    with torch.inference_mode():
        c = scorer.model.encode_context(ctx, present, task_type)
        memory = scorer.model.context_memory(ctx, present)
        expected = torch.sigmoid(scorer.model.score_candidates(c, cand, task_type, memory).double()).numpy()
    got = scorer.score("home", {"user": "7", "country": "us"}, ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_ids_written_otherwise_score_as_the_catalogue_text(scorer: Scorer):
    """Catalogue text takes the row lookup; "007", " 7" and 7 take the Arrow path and score the same."""
    ctx = {"user": "7", "country": "us"}
    canonical = ["7", "12", "3"]
    assert scorer.prepare("home", ctx, canonical).rows.tolist() == [
        scorer._row_of["item"][i] for i in canonical
    ]
    for written in (["007", "12", "3"], [" 7", "12 ", "3"], [7, 12, 3], ["7", "12", "not-an-item"]):
        assert scorer.prepare("home", ctx, written).rows is None, written
    expected = scorer.score("home", ctx, canonical)
    for written in (["007", "12", "3"], [" 7", "12 ", "3"], [7, 12, 3]):
        np.testing.assert_array_equal(scorer.score("home", ctx, written), expected)
    mixed = scorer.encode_prepared(
        [scorer.prepare("home", ctx, canonical), scorer.prepare("home", ctx, [7, 12, 3])]
    )
    # one batch, each part by its own path: equal up to the batched matmul's rounding
    np.testing.assert_allclose(scorer.score_encoded(mixed)[1], expected, rtol=0, atol=1e-6)


def test_requests_encoded_together_score_as_each_alone(scorer: Scorer):
    """encode_prepared over requests of different users (their own histories, attended per candidate),
    tasks, candidate counts and history lengths gives every request the scores it gets alone."""
    snap = scorer.spec.extras["history"]
    requests = [
        ("home", {"user": "7", "country": "us"}, ["1", "2", "3"]),
        ("home", {"user": "8", snap["field"]: ["4", "5"]}, ["5", "not-an-item", "9", "1", "2"]),
        ("related", {"source_item": "5"}, ["1", "2"]),
        ("home", {"user": "9", snap["field"]: ["4", "5", "6", "7", "8", "9", "10"] * 5}, ["3"]),
        ("home", {}, ["2", "4"]),
    ]
    together = scorer.score_encoded(scorer.encode_prepared([scorer.prepare(*r) for r in requests]))
    for r, got in zip(requests, together):
        np.testing.assert_allclose(got, scorer.score(*r), rtol=0, atol=1e-6)
    assert abs(together[0][0] - together[1][3]) > 1e-7  # item 1 for two users: one context did not leak


def test_an_unknown_field_is_named(scorer: Scorer):
    with pytest.raises(RequestError, match="context.colour: not a field") as e:
        scorer.score("home", {"colour": "red"}, ["1"])
    assert e.value.field == "context.colour"
    with pytest.raises(RequestError, match="unknown task 'notify'"):
        scorer.score("notify", {}, ["1"])


def test_fields_the_task_does_not_use_stay_at_their_sentinel(scorer: Scorer):
    """related never saw a user in training: a caller's user is ignored, not fed in as present."""
    base = scorer.score("related", {"source_item": "5"}, ["1", "2"])
    assert scorer.check_context("related", {"source_item": "5", "user": "3"})[1] == ["user"]
    np.testing.assert_array_equal(
        scorer.score("related", {"source_item": "5", "user": "3"}, ["1", "2"]), base
    )
    assert np.abs(scorer.score("related", {}, ["1", "2"]) - base).max() > 1e-7  # a used field does count


def test_popular_follows_the_popularity_table(scorer: Scorer, artifact: Path):
    pop = pq.read_table(artifact / "popularity.parquet").to_pylist()
    vocab = json.loads((artifact / "vocab" / "item.json").read_text())
    home = sorted((r for r in pop if r["task"] == "home"), key=lambda r: -r["count"])
    top = scorer.popular("home", 3)
    assert [vocab[r["index"] - 2] for r in home[:1]] == top[:1]
    share = scorer.popularity("home", top)
    assert list(share) == sorted(share, reverse=True) and 0 < share.sum() <= 1


@pytest.mark.parametrize("bound", ["_MEMO_SIZE", "_MEMO_BYTES"])
def test_a_memo_cleared_mid_request_keeps_the_rows_the_request_needs(artifact: Path, monkeypatch, bound):
    """With the memo bound at 0 every request with a new value clears it; the rows it already took from the
    memo (country, the unset fields) must still be its own, and its scores those of an unbounded memo."""
    import unirec.serve.scorer as scorer_module

    reference = Scorer.load(artifact, warm=False)
    contexts = [
        {"user": "7", "country": "us"},
        {"user": "8", "country": "us"},
        {"user": "9", "country": "de"},
    ]
    expected = [reference.score("home", c, ["1", "2", "3"]) for c in contexts]
    monkeypatch.setattr(scorer_module, bound, 0)
    tiny = Scorer.load(artifact, warm=False)
    for c, want in zip(contexts, expected):
        np.testing.assert_array_equal(tiny.score("home", c, ["1", "2", "3"]), want)
    assert len(tiny._memo) < len(reference._memo)  # the bound did clear it
