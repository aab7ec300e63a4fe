"""Full-catalogue ranking: metrics worked by hand, the exclusion of seen items, and the request builder."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from unirec.config import ModelConfig
from unirec.model import MultiTaskRanker
from unirec.model.towers import TOWERS
from unirec.ranking import full_ranking, rank_metrics, ranking_requests, seen_items
from unirec.schema import CandidateSpec, FeatureSpec, FieldSpec, TableSpec, TaskSpec

CATALOGUE = pa.array(["10", "11", "12", "13", "14"])


def test_rank_metrics_by_hand():
    s = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5],  # positive row 2 -> rank 3
            [0.1, 0.2, 0.3, 0.4, 0.5],  # positives 4 (rank 1) and 0 (rank 5)
            [0.5, 0.5, 0.5, 0.5, 0.5],  # a constant scorer: the average rank, 3
        ]
    )
    m = rank_metrics(s, [np.array([2]), np.array([4, 0]), np.array([1])], [np.zeros(0, int)] * 3, k=3)
    assert m["rank"].tolist() == [3.0, 1.0, 3.0]
    assert m["mrr"].tolist() == pytest.approx([1 / 3, 1.0, 1 / 3])
    assert m["recall@3"].tolist() == pytest.approx([1.0, 0.5, 1.0])
    ideal2 = 1 + 1 / math.log2(3)
    assert m["ndcg@3"].tolist() == pytest.approx([1 / 2, 1 / ideal2, 1 / 2])


def test_excluded_items_leave_the_ranking():
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    m = rank_metrics(s, [np.array([2])], [np.array([0, 1])], k=1)
    assert m["rank"][0] == 1.0 and m["recall@1"][0] == 1.0 and m["ndcg@1"][0] == 1.0


def _write_labeled(root, split, task, rows):
    d = root / "labeled" / f"split={split}" / f"task={task}"
    d.mkdir(parents=True)
    cols = {k: [r[k] for r in rows] for k in ("request_id", "candidate", "label", "user")}
    pq.write_table(pa.table(cols), d / "part-00000.parquet")


def test_seen_items_prefers_the_interaction_history(tmp_path):
    # labeled train positives: user 1 saw 10 on a canvas with a user; 13 went to a canvas without one
    _write_labeled(tmp_path, "train", "home", [
        dict(request_id=1, candidate="10", label=1.0, user="1"),
        dict(request_id=1, candidate="11", label=0.0, user="1"),  # a negative is not "seen"
    ])  # fmt: skip
    _write_labeled(tmp_path, "train", "related", [dict(request_id=2, candidate="13", label=1.0, user=None)])
    assert {u: r.tolist() for u, r in seen_items(tmp_path, CATALOGUE).items()} == {"1": [0]}
    (tmp_path / "raw").mkdir()
    hist = pa.table(
        {"user_id": [1, 1, 1, 2], "item_id": [10, 13, 12, 99], "split": ["train", "train", "test", "train"]}
    )
    pq.write_table(hist, tmp_path / "raw" / "interactions.parquet")
    # the history has the related-canvas item; test events and items outside the catalogue are not seen
    assert {u: r.tolist() for u, r in seen_items(tmp_path, CATALOGUE).items()} == {"1": [0, 3]}
    # a test request also excludes the valid split's items (the sequential protocol)
    hist = hist.set_column(2, "split", pa.array(["train", "train", "valid", "train"]))
    pq.write_table(hist, tmp_path / "raw" / "interactions.parquet")
    assert {u: r.tolist() for u, r in seen_items(tmp_path, CATALOGUE, split="valid").items()} == {"1": [0, 3]}
    assert {u: r.tolist() for u, r in seen_items(tmp_path, CATALOGUE, split="test").items()} == {
        "1": [0, 2, 3]
    }


def test_ranking_requests_groups_positives_and_counts_unrankable(tmp_path):
    _write_labeled(tmp_path, "test", "home", [
        dict(request_id=7, candidate="12", label=1.0, user="1"),
        dict(request_id=7, candidate="14", label=0.0, user="1"),
        dict(request_id=5, candidate="11", label=1.0, user="2"),
        dict(request_id=5, candidate="404", label=1.0, user="2"),  # not in the catalogue
        dict(request_id=9, candidate="404", label=1.0, user="3"),  # nothing rankable: dropped
    ])  # fmt: skip
    seen = {"1": np.array([0, 2]), "2": np.array([0])}
    req = ranking_requests(tmp_path, "test", "home", CATALOGUE, seen)
    assert req.context["request_id"].to_pylist() == [5, 7]
    assert [p.tolist() for p in req.positives] == [[1], [2]]
    assert [e.tolist() for e in req.exclude] == [[0], [0]]  # user 1's positive 12 stays rankable
    assert req.unrankable == 2


def test_full_ranking_of_an_oracle_and_of_its_reverse(tmp_path):
    _write_labeled(tmp_path, "test", "home", [
        dict(request_id=r, candidate=c, label=1.0, user=u) for r, c, u in [(1, "11", "1"), (2, "14", "2")]
    ])  # fmt: skip
    _write_labeled(tmp_path, "train", "home", [dict(request_id=0, candidate="10", label=1.0, user="2")])
    spec = FeatureSpec(
        context={"user": FieldSpec("user", "categorical", table="user")},
        candidates={"item": CandidateSpec("item", "items.parquet", "item_id", "item", ("item",))},
        candidate_fields={"item": FieldSpec("item", "categorical", table="item", column="item_id")},
        tasks={"home": TaskSpec("home", 0, "item", ("user",))},
        tables={"user": TableSpec("user", 4), "item": TableSpec("item", 7)},
    )
    truth = {1: 1, 2: 4}

    def oracle(sign):
        def score(task, context):
            s = torch.zeros(context.num_rows, len(CATALOGUE))
            for i, r in enumerate(context["request_id"].to_pylist()):
                s[i, truth[r]] = sign
            return s

        return score

    res = full_ranking({"up": oracle(1.0), "down": oracle(-1.0)}, tmp_path, spec, "test", {"item": CATALOGUE})
    assert res["up"]["home"]["ndcg@10"] == 1.0 and res["up"]["home"]["mrr"] == 1.0
    # reversed: request 1 ranks last of 5; request 2 last of 4, since user 2's train item 10 is removed
    assert res["down"]["home"]["mrr"] == pytest.approx((1 / 5 + 1 / 4) / 2)
    assert res["down"]["home"]["requests"] == 2


@pytest.mark.parametrize("tower", TOWERS)
def test_score_matrix_rows_equal_score_vectors(tower):
    spec = FeatureSpec(
        context={"user": FieldSpec("user", "categorical", table="user")},
        candidates={"item": CandidateSpec("item", "items.parquet", "item_id", "item", ("item",))},
        candidate_fields={"item": FieldSpec("item", "categorical", table="item", column="item_id")},
        tasks={"a": TaskSpec("a", 0, "item", ("user",)), "b": TaskSpec("b", 1, "item", ("user",))},
        tables={"user": TableSpec("user", 5), "item": TableSpec("item", 9)},
    )
    torch.manual_seed(0)
    m = MultiTaskRanker(spec, ModelConfig(embedding_dim=4, hidden_dim=8, tower=tower)).eval()
    tt = torch.tensor([0, 1, 1])
    c = m.encode_context({"user": torch.tensor([2, 3, 4])}, torch.ones(3, 1), tt)
    v = m.encode_candidates({"item": torch.arange(2, 9)})
    mat = m.score_matrix(c, v, tt)
    assert mat.shape == (3, 7)
    for i in range(3):
        assert torch.allclose(mat[i], m.score_vectors(c[i : i + 1], v, tt[i : i + 1]), atol=1e-6)
