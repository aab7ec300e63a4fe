"""MovieLens-100K: both layouts load to the same tables, and the canvas derivation is the documented one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from unirec.data import movielens as ml

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ml100k"
_OCCUPATIONS = ("student", "engineer", "artist", "other", "writer")


def write_grouplens(d: Path, n_users: int = 40, n_items: int = 60, seed: int = 0, events=(5, 25)) -> Path:
    """A small MovieLens-like data set in the GroupLens layout (random users, items and ratings)."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(1, n_items + 1):
        flags = np.zeros(len(ml.GENRES), dtype=int)
        flags[rng.choice(np.arange(1, len(ml.GENRES)), size=rng.integers(1, 4), replace=False)] = 1
        year = int(rng.integers(1930, 1999))
        title = f"Movie {i} {'ABCDEFGH'[i % 8]}word ({year})"
        lines.append(f"{i}|{title}|01-Jan-{year}||http://x|" + "|".join(map(str, flags)))
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    users = [
        f"{u}|{rng.integers(10, 70)}|{'MF'[rng.integers(0, 2)]}|{_OCCUPATIONS[rng.integers(0, 5)]}|{10000 + u}"
        for u in range(1, n_users + 1)
    ]
    (d / "u.user").write_text("\n".join(users) + "\n")
    rows = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(*events))
        items = rng.choice(np.arange(1, n_items + 1), size=n, replace=False)
        ts = 880_000_000 + np.sort(rng.integers(0, 5_000_000, n))
        ts[1::4] = ts[0::4][: len(ts[1::4])]  # ties: the file's row order breaks them
        rows += [f"{u}\t{i}\t{rng.integers(1, 6)}\t{t}" for i, t in zip(items, ts)]
    (d / "u.data").write_text("\n".join(rows) + "\n")
    return d


def _derived(tmp_path, seed=0, cfg=None, **kw):
    src = write_grouplens(tmp_path / "src", **kw)
    out = tmp_path / f"out-{seed}"
    summary = ml.derive(ml.load(src), out, seed, cfg)
    return ml.load(src), out, summary


def _logs(out: Path):
    return {c: pq.read_table(out / c / "part-00000.parquet") for c in ml.CANVASES}


def test_both_layouts_load_to_identical_tables():
    gl = ml.load(FIXTURES / "grouplens")
    rb = ml.load(FIXTURES / "recbole")
    assert ml.find_layout(FIXTURES / "grouplens")[0] == "grouplens"
    assert ml.find_layout(FIXTURES / "recbole")[0] == "recbole"
    for name, schema in (("ratings", ml.RATINGS), ("users", ml.USERS), ("items", ml.ITEMS)):
        a, b = getattr(gl, name), getattr(rb, name)
        assert a.schema == b.schema == schema
        assert a.equals(b), (name, a.to_pylist(), b.to_pylist())
    items = {r["item_id"]: r for r in gl.items.to_pylist()}
    assert items[10] == {"item_id": 10, "title": "Richard III", "year": 1995, "genres": ["Drama", "War"]}
    assert items[11]["title"] == "Seven (Se7en)" and items[543]["title"] == "Misérables, Les"
    assert items[267] == {"item_id": 267, "title": None, "year": None, "genres": ["unknown"]}
    assert items[1]["genres"] == ["Animation", "Children's", "Comedy"]
    assert gl.users.to_pylist()[2] == {
        "user_id": 3, "age": 17, "gender": "M", "occupation": "student", "zip_code": "T8H1N"
    }  # fmt: skip
    # sorted by (user, timestamp), ties in the file's row order (both fixtures list the ratings in the same
    # order, as the real files do): the tie of user 1 at 874965478 keeps item 1 before item 543
    assert gl.ratings.slice(0, 2).to_pylist() == [
        {"user_id": 1, "item_id": 1, "rating": 5, "timestamp": 874965478},
        {"user_id": 1, "item_id": 543, "rating": 4, "timestamp": 874965478},
    ]


def test_layout_is_found_one_level_down_and_missing_files_are_named(tmp_path):
    assert ml.find_layout(FIXTURES)[0] in ("grouplens", "recbole")
    with pytest.raises(FileNotFoundError, match="u.data"):
        ml.load(tmp_path)


def test_ties_within_one_second_keep_the_file_order(tmp_path):
    """Two ratings in the same second: the one written later in the file is the later event, whatever the
    item ids, so swapping the two lines swaps the test item."""
    lines = ["7\t900\t4\t100", "7\t5\t3\t50", "7\t30\t5\t200", "7\t2\t3\t200"]

    def test_item(rows):
        ratings = pa.table(
            {c: pa.array([int(r.split("\t")[k]) for r in rows]) for k, c in enumerate(ml.RATINGS.names)}
        )
        ev = ml.split_events(ratings)
        return {s: ev["item"][ev["split"] == s].tolist() for s in ("train", "valid", "test")}

    assert test_item(lines) == {"train": [5, 900], "valid": [30], "test": [2]}
    assert test_item(lines[:2] + lines[:1:-1]) == {"train": [5, 900], "valid": [2], "test": [30]}


def test_leave_last_out_split_and_previous_item(tmp_path):
    data, _, _ = _derived(tmp_path)
    ev = ml.split_events(data.ratings)
    for u in np.unique(ev["user"]):
        rows = np.flatnonzero(ev["user"] == u)
        assert (np.diff(ev["ts"][rows]) >= 0).all()  # in time order (ties: see the file-order test)
        assert list(ev["split"][rows][-2:]) == ["valid", "test"]
        assert set(ev["split"][rows][:-2]) <= {"train"}
        assert ev["prev"][rows[0]] == -1 and (ev["prev"][rows[1:]] == ev["item"][rows[:-1]]).all()


def test_canvas_shares_and_first_event_goes_home():
    n = 200_000
    rng = np.random.default_rng(1)
    user, item = rng.integers(1, 10_000, n), rng.integers(1, 2_000, n)
    canvas = ml.assign_canvas(0, user, item, np.zeros(n, bool))
    shares = np.bincount(canvas, minlength=4) / n
    assert np.allclose(shares, ml.SHARES, atol=0.005), shares
    assert (ml.assign_canvas(0, user, item, np.ones(n, bool)) == 0).all()
    assert (ml.assign_canvas(0, user, item, np.zeros(n, bool)) == canvas).all()  # a pure function of the key
    assert (ml.assign_canvas(1, user, item, np.zeros(n, bool)) != canvas).mean() > 0.5  # seeded


def test_requests_contexts_and_negatives(tmp_path):
    data, out, summary = _derived(tmp_path)
    logs = _logs(out)
    ev = ml.split_events(data.ratings)
    n_users = len(np.unique(ev["user"]))
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    users = {r["user_id"]: r for r in data.users.to_pylist()}
    train_items = {}
    for u, i, s in zip(ev["user"], ev["item"], ev["split"]):
        if s == "train":
            train_items.setdefault(u, set()).add(i)
    all_items = {}
    for u, i in zip(ev["user"], ev["item"]):
        all_items.setdefault(u, set()).add(i)
    n_train = int((ev["split"] == "train").sum())
    assert sum(v["requests"]["train"] for v in summary["canvases"].values()) == n_train
    eval_negs = {}
    for name, t in logs.items():
        assert t.column_names == [
            *ml.CANVAS_COLUMNS[name],
            "item_id",
            "label",
            "timestamp",
            "split",
            "event_order",
        ]
        pos = t.filter(pc.equal(t["label"], 1)).to_pylist()
        for s in ("valid", "test"):  # one request per valid/test event on every canvas
            assert sum(r["split"] == s for r in pos) == n_users
        for r in pos:
            it = items[r["item_id"]]
            genres = [g.lower() for g in it["genres"]]
            if name == "home":
                assert r["occupation"] == users[r["user_id"]]["occupation"]
            elif name == "search":
                words = r["query"].split()
                assert words[0] in genres and words[1] == f"{it['year'] // 10 * 10}s" and len(words) <= 3
            elif name == "genre":
                assert r["genre"] in genres
        by_req = {}
        for r in t.to_pylist():
            by_req.setdefault(r["request_id"], []).append(r)
        for rows in by_req.values():
            p = rows[0]
            assert p["label"] == 1 and all(r["label"] == 0 for r in rows[1:])
            assert len({r["item_id"] for r in rows}) == len(rows)  # no item twice in a request
            negs = {r["item_id"] for r in rows[1:]}
            if p["split"] == "train":
                assert len(negs) == 4
                if name != "related":
                    assert not negs & train_items.get(p["user_id"], set())
                assert p["item_id"] not in negs
            else:
                assert len(negs) == min(100, len(items) - len(all_items[_user_of(p, ev)]))
                eval_negs.setdefault(p["request_id"] // 4, []).append(negs)
                assert not negs & all_items[_user_of(p, ev)]
    assert all(len(v) == 4 and all(n == v[0] for n in v) for v in eval_negs.values())
    # related: the source item is the user's previous item; the first event never reaches related
    rel = logs["related"].filter(pc.equal(logs["related"]["label"], 1))
    prev = dict(zip(np.arange(len(ev["prev"])) * 4 + 1, ev["prev"]))
    assert all(prev[r["request_id"]] == r["source_item_id"] for r in rel.to_pylist())
    first_train = set(np.flatnonzero((ev["pos"] == 0) & (ev["split"] == "train")))
    assert first_train
    for name, t in logs.items():
        events = set(pc.divide(t["request_id"], 4).to_pylist())
        assert first_train <= events if name == "home" else not first_train & events


def _user_of(row, ev):
    return ev["user"][row["request_id"] // 4]


def test_event_order_is_the_position_within_the_user(tmp_path):
    data, out, _ = _derived(tmp_path)
    ev = ml.split_events(data.ratings)
    inter = pq.read_table(out / ml.INTERACTIONS)
    assert inter.column_names == ["user_id", "item_id", "timestamp", "split", "event_order"]
    assert inter.schema.field("event_order").type == pa.int64()
    order = {}
    for r in inter.to_pylist():  # 0, 1, 2, ... per user, in time order
        order.setdefault(r["user_id"], []).append((r["timestamp"], r["event_order"]))
    for rows in order.values():
        assert [o for _, o in rows] == list(range(len(rows))) and rows == sorted(rows)
    position = dict(zip(zip(ev["user"].tolist(), ev["item"].tolist()), ev["pos"].tolist()))
    for t in _logs(out).values():  # every row, negatives included, carries its request's event order
        assert t.schema.field("event_order").type == pa.int64()
        rows = t.to_pylist()
        pos = {r["request_id"]: r for r in rows if r["label"] == 1}
        for r in rows:
            p = pos[r["request_id"]]
            event = r["request_id"] // 4
            assert r["event_order"] == p["event_order"] == ev["pos"][event]
            assert position[(int(ev["user"][event]), p["item_id"])] == p["event_order"]


def test_popularity_negatives_and_knobs(tmp_path):
    cfg = ml.MovieLensConfig(
        negatives=2, negative_sampling="popularity", eval_negatives=5, title_word_prob=1.0
    )
    _, out, _ = _derived(tmp_path, cfg=cfg)
    logs = _logs(out)
    search = logs["search"].filter(pc.equal(logs["search"]["label"], 1))
    assert all(len(q.split()) == 3 for q in search["query"].to_pylist())  # always a title word
    home = logs["home"].to_pylist()
    per_req = {}
    for r in home:
        per_req.setdefault((r["request_id"], r["split"]), 0)
        per_req[(r["request_id"], r["split"])] += 1
    assert {v for (_, s), v in per_req.items() if s == "train"} == {3}
    assert {v for (_, s), v in per_req.items() if s != "train"} == {6}
    with pytest.raises(ValueError, match="negative_sampling"):
        ml.derive(
            ml.load(FIXTURES / "grouplens"), tmp_path / "x", 0, ml.MovieLensConfig(negative_sampling="zipf")
        )


def test_derivation_is_deterministic_and_seeded(tmp_path):
    src = write_grouplens(tmp_path / "src")
    data = ml.load(src)
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, (0, 0, 1)):
        ml.derive(data, out, seed)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files and all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files)
    assert (outs[0] / "home" / "part-00000.parquet").read_bytes() != (
        outs[2] / "home" / "part-00000.parquet"
    ).read_bytes()


def test_fixture_derives_with_tiny_histories(tmp_path):
    # users with 3-4 events: every valid/test event still gets its four requests
    summary = ml.derive(ml.load(FIXTURES / "recbole"), tmp_path, 0)
    assert all(v["requests"]["valid"] == 3 == v["requests"]["test"] for v in summary["canvases"].values())
    assert pa.types.is_int64(pq.read_table(tmp_path / "items.parquet").schema.field("item_id").type)


def test_age_buckets():
    got = ml.age_bucket(np.array([7, 17, 18, 24, 25, 44, 45, 49, 50, 55, 56, 73]))
    assert list(got) == ["under18", "under18", "18-24", "18-24", "25-34", "35-44", "45-49", "45-49",
                         "50-55", "50-55", "56+", "56+"]  # fmt: skip


def test_precomputed_split_column_is_honoured_and_checked():
    from unirec.config import compose
    from unirec.data import labels

    cfg = compose(["data=movielens", "task=[movielens/genre]"])
    task = cfg.task["genre"]
    raw = pa.table(
        {
            "request_id": [1, 1, 2, 3, 4],
            "user_id": [7, 7, 7, 7, 7],
            "genre": ["drama"] * 5,
            "item_id": [10, 11, 10, 12, 11],
            "label": pa.array([1, 0, 1, 1, 1], pa.int8()),
            "timestamp": [890_000_000, 890_000_000, 880_000_000, 870_000_000, 875_000_000],
            "split": ["train", "train", "test", "valid", "later"],
            "event_order": [3, 3, 0, 1, 2],
        }
    )
    examples, rejects = labels.labeled_examples(raw, task, pa.array([10, 11, 12]), task.context, seed=0)
    assert labels.count_reasons(rejects) == {"bad_split": 1}
    by_split = labels.split_by_time(examples, labels.time_cutoffs([examples], cfg.data.split))
    # the split column wins over time: the latest request is train, the earliest valid
    assert [by_split[s].num_rows for s in labels.SPLITS] == [2, 1, 1]
    assert by_split["train"]["timestamp"].to_pylist() == [890_000_000] * 2
    assert all(labels.SPLIT not in t.column_names for t in by_split.values())
