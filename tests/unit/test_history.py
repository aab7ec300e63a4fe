"""The point-in-time history join: pinned on a tiny example, against a brute force, and on MovieLens."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.unit.test_movielens import write_grouplens
from unirec.data import movielens as ml
from unirec.data.history import ORDER, history_for_partition, history_snapshot, point_in_time_history

# Events: user ids as text ("002" is user 2), requests: as int64. Item 13 has no order and comes first in
# the table, yet sorts after the ordered events of its second (nulls last); item 99 has no user.
EVENTS = pa.table(
    {
        "user": ["1", "1", "1", "1", "002", "2", "2", "3", "3", "3", "3", "3", None],
        "item": ["13", "10", "11", "12", "x5", "6", "7", "1", "2", "3", "4", "5", "99"],
        "timestamp": [100, 100, 100, 200, 50, 50, 60, 1, 2, 3, 4, 5, 1],
        ORDER: pa.array([None, 0, 1, 2, None, None, 0, 0, 1, 2, 3, 4, None], pa.int64()),
    }
)
REQUESTS = pa.table(
    {
        "uid": pa.array([1, 1, 1, 1, 1, 2, 2, 3, None, 4], pa.int64()),
        "timestamp": [100, 100, 100, 200, 201, 50, 61, 10, 10, 10],
        ORDER: pa.array([1, None, 0, None, None, 5, None, None, None, None], pa.int64()),
    }
)
EXPECTED = [
    ["10"],  # same second, order 0 < 1: precedes; order 1 (equal) and the unordered 13 do not
    [],  # same second, no request order: strictly earlier only
    [],  # order 0 is not below order 0
    ["10", "11", "13"],  # all of second 100, unordered last
    ["11", "13", "12"],  # the most recent three
    [],  # the events of second 50 have no order: they do not precede
    ["6", "x5", "7"],  # unordered ties of a second: by item text, not by the table's row order
    ["3", "4", "5"],  # truncated to max_len
    None,  # null user
    [],  # a user without events
]


def _join(requests, events, max_len=3, **kw):
    return point_in_time_history(
        requests, events, key="user", item="item", max_len=max_len, request_key="uid", **kw
    )


def test_tiny_example_is_pinned():
    got = _join(REQUESTS, EVENTS)
    assert got.type == pa.list_(pa.string())
    assert got.to_pylist() == EXPECTED
    for p in (2, 5):
        assert _join(REQUESTS, EVENTS, partitions=p).to_pylist() == EXPECTED
    part = history_for_partition(REQUESTS, EVENTS, key="user", item="item", max_len=3, request_key="uid")
    assert part.to_pylist() == EXPECTED


def test_without_event_order_equal_timestamps_never_precede():
    got = _join(REQUESTS.drop_columns([ORDER]), EVENTS).to_pylist()
    assert got[0] == [] and got[5] == []  # the ordered ties of EXPECTED[0] and EXPECTED[5] fall away
    got = _join(REQUESTS, EVENTS.drop_columns([ORDER])).to_pylist()
    assert got[0] == [] and got[3] == ["10", "11", "13"]  # unordered: item text within the second


def test_history_snapshot_is_pinned():
    snap = history_snapshot(EVENTS, key="user", item="item", max_len=3)
    assert snap.schema == pa.schema([("user", pa.string()), ("history", pa.list_(pa.string()))])
    assert snap.to_pylist() == [
        {"user": "1", "history": ["11", "13", "12"]},
        {"user": "2", "history": ["6", "x5", "7"]},
        {"user": "3", "history": ["3", "4", "5"]},
    ]
    # a request after every event gets the snapshot
    after = pa.table({"uid": ["1", "2", "3"], "timestamp": [10**9] * 3})
    assert _join(after, EVENTS).to_pylist() == snap["history"].to_pylist()


def test_missing_columns_name_the_table():
    with pytest.raises(KeyError, match=r"requests table lacks column\(s\) \['uid'\]"):
        _join(REQUESTS.drop_columns(["uid"]), EVENTS)
    with pytest.raises(KeyError, match=r"events table lacks column\(s\) \['item'\]"):
        _join(REQUESTS, EVENTS.drop_columns(["item"]))
    with pytest.raises(ValueError, match="partitions"):
        _join(REQUESTS, EVENTS, partitions=0)


def _random(seed: int, n_events: int = 400, n_requests: int = 300):
    """Random users (ints in events, text in requests), many equal timestamps and orders, some nulls.
    Item ``1000 + row`` names each event, so a history item tells which event it came from."""
    rng = np.random.default_rng(seed)
    e_user = rng.integers(0, 12, n_events)
    e_ts, e_ord = rng.integers(0, 15, n_events), rng.integers(0, 4, n_events)
    e_has = rng.random(n_events) < 0.7
    events = pa.table(
        {
            "user": e_user,
            "item": 1000 + np.arange(n_events),
            "timestamp": e_ts,
            ORDER: pa.array(e_ord, pa.int64(), mask=~e_has),
        }
    )
    r_user = rng.integers(0, 14, n_requests)  # users 12 and 13 have no events
    r_null = rng.random(n_requests) < 0.05
    r_ts, r_ord = rng.integers(0, 16, n_requests), rng.integers(0, 4, n_requests)
    r_has = rng.random(n_requests) < 0.7
    requests = pa.table(
        {
            "uid": pa.array([f"0{u}" for u in r_user], pa.string(), mask=r_null),
            "timestamp": r_ts,
            ORDER: pa.array(r_ord, pa.int64(), mask=~r_has),
        }
    )
    return requests, events


def _precedes(e: dict, r: dict) -> bool:
    if e["timestamp"] != r["timestamp"]:
        return e["timestamp"] < r["timestamp"]
    return e[ORDER] is not None and r[ORDER] is not None and e[ORDER] < r[ORDER]


def _brute_force(requests: pa.Table, events: pa.Table, max_len: int):
    ev = [dict(e, row=i) for i, e in enumerate(events.to_pylist())]
    out = []
    for r in requests.to_pylist():
        if r["uid"] is None:
            out.append(None)
            continue
        before = [e for e in ev if str(e["user"]) == str(int(r["uid"])) and _precedes(e, r)]
        before.sort(key=lambda e: (e["timestamp"], e[ORDER] is None, e[ORDER] or 0, str(e["item"])))
        out.append([str(e["item"]) for e in before][len(before) - min(max_len, len(before)) :])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_histories_never_leak_and_match_brute_force(seed):
    requests, events = _random(seed)
    got = _join(requests, events, max_len=5, partitions=3).to_pylist()
    ev = events.to_pylist()
    for r, hist in zip(requests.to_pylist(), got):
        for it in hist or []:
            e = ev[int(it) - 1000]
            assert str(e["user"]) == str(int(r["uid"])) and _precedes(e, r), (r, e)
    assert got == _brute_force(requests, events, max_len=5)
    assert sum(len(h) == 5 for h in got if h) > 50  # truncation happens, so the property is not vacuous


def test_partition_count_does_not_change_the_result():
    requests, events = _random(7, n_events=600, n_requests=500)
    results = [_join(requests, events, max_len=4, partitions=p) for p in (1, 3, 7)]
    assert results[0].to_pylist() == results[1].to_pylist() == results[2].to_pylist()
    assert results[0].equals(_join(requests, events, max_len=4))  # the default bucket count


def test_movielens_test_request_sees_train_and_valid_in_order(tmp_path):
    out = tmp_path / "out"
    ml.derive(ml.load(write_grouplens(tmp_path / "src")), out, seed=0)
    events = pq.read_table(out / ml.INTERACTIONS)
    home = pq.read_table(out / "home" / "part-00000.parquet")
    requests = home.filter(pc.and_(pc.equal(home["split"], "test"), pc.equal(home["label"], 1)))
    requests = requests.sort_by("user_id")
    expected = {}
    for e in events.sort_by([("user_id", "ascending"), (ORDER, "ascending")]).to_pylist():
        if e["split"] != "test":
            expected.setdefault(e["user_id"], []).append(str(e["item_id"]))
    users = requests["user_id"].to_pylist()
    assert len(users) == 40 == len(expected)

    def join(reqs, max_len):
        return point_in_time_history(reqs, events, key="user_id", item="item_id", max_len=max_len).to_pylist()

    assert join(requests, 1000) == [expected[u] for u in users]
    assert join(requests, 3) == [expected[u][-3:] for u in users]
    # the fixture ties some test events with their valid event: only the order lets those in
    unordered = join(requests.drop_columns([ORDER]), 1000)
    assert 0 < sum(a != b for a, b in zip(unordered, join(requests, 1000))) < len(users)
