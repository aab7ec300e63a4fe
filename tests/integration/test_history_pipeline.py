"""The history field through the real preparation: point-in-time, never leaking, on both data sets."""

from __future__ import annotations

from collections import defaultdict

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.unit.test_movielens import write_grouplens
from unirec.config import compose
from unirec.data import labels
from unirec.data.prepare import prepare

ML_TASKS = "task=[movielens/home,movielens/related,movielens/search,movielens/genre]"
MAX_LEN = 5


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
    source = write_grouplens(tmp_path_factory.mktemp("ml") / "ml-100k", n_users=40, n_items=60)
    cfg = compose(["data=movielens", f"data.raw_dir={source}", ML_TASKS, "data.history.enabled=true",
                   f"data.history.max_len={MAX_LEN}", f"data.cache_dir={tmp_path_factory.mktemp('c')}"])  # fmt: skip
    return prepare(cfg.data, cfg.task, cfg.seed).parent


def _rows(root, task):
    return [r for s in labels.SPLITS for r in _split(root, s, task)]


def _split(root, split, task):
    t = pq.read_table(root / "labeled" / f"split={split}" / f"task={task}")
    return [dict(r, split=split) for r in t.to_pylist()]


def test_movielens_history_is_every_earlier_event_and_test_sees_train_and_valid(movielens):
    events = pq.read_table(movielens / "raw" / "interactions.parquet").to_pylist()
    by_user = defaultdict(list)
    for e in sorted(events, key=lambda e: (e["user_id"], e["timestamp"], e["event_order"])):
        by_user[str(e["user_id"])].append(e)
    checked = 0
    for task in ("home", "search", "genre"):
        for r in _rows(movielens, task):
            earlier = [
                e
                for e in by_user[r["user"]]
                if (e["timestamp"], e["event_order"]) < (r["timestamp"], r["event_order"])
            ]
            assert r["history"] == [str(e["item_id"]) for e in earlier][-MAX_LEN:], (task, r)
            if r["split"] == "test":
                before = [str(e["item_id"]) for e in by_user[r["user"]] if e["split"] != "test"]
                assert r["history"] == before[-MAX_LEN:]
            checked += 1
    assert checked > 500
    # related requests carry no user: no history, and the feature is missing for them
    assert all(r["history"] is None for r in _rows(movielens, "related"))
    spec_fields = pq.read_table(movielens / "features" / "train" / "related").column("has.history")
    assert set(spec_fields.to_pylist()) == {0}


def test_synthetic_history_holds_only_earlier_positives_of_every_item_canvas(tmp_path):
    cfg = compose(["debug=toy", f"data.cache_dir={tmp_path}", "data.history.enabled=true",
                   f"data.history.max_len={MAX_LEN}"])  # fmt: skip
    root = prepare(cfg.data, cfg.task, cfg.seed).parent
    item_tasks = [t for t, c in cfg.task.items() if "user" in c.context and c.candidate == "item"]
    clicks = defaultdict(list)
    for task in item_tasks:
        for r in _rows(root, task):
            if r["label"] > 0:
                clicks[r["user"]].append((r["timestamp"], r["candidate"]))
    with_history = 0
    for task, c in cfg.task.items():
        for r in _rows(root, task):
            if "user" not in c.context:
                assert r["history"] is None
                continue
            earlier = sorted(e for e in clicks[r["user"]] if e[0] < r["timestamp"])
            assert sorted(r["history"]) == sorted(i for _, i in earlier[-MAX_LEN:]) or _tied(earlier, r)
            with_history += bool(r["history"])
    assert with_history > 100
    snapshot = pq.read_table(root / "features" / "history.parquet")
    clicked = sum(1 for v in clicks.values() if v)
    assert (
        snapshot.num_rows == clicked and max(pc.list_value_length(snapshot["history"]).to_pylist()) == MAX_LEN
    )


def _tied(earlier, row) -> bool:
    """The engagements of one second keep their log order, so the cut at max_len may fall inside a tie."""
    return len(earlier) > MAX_LEN and earlier[-MAX_LEN - 1][0] == earlier[-MAX_LEN][0]
