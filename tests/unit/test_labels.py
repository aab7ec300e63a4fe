"""Label preparation: exact reject counts per reason, every good row arrives, no split leakage."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unirec.config import compose
from unirec.data.labels import REQUEST, SPLITS, TIMESTAMP
from unirec.data.prepare import build, read_raw
from unirec.data.synthetic import generate

FAR_FUTURE_S = 4_102_444_800  # 2100-01-01


def _append_bad_rows(canvas_dir, edits):
    """Write a part file of copies of the canvas's first row, each changed by one edit."""
    table = read_raw(canvas_dir)
    base = table.slice(0, 1).to_pylist()[0]
    rows = [{**base, **e} if e is not None else dict(base) for e in edits]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), canvas_dir / "part-99999.parquet")


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    cfg = compose(["debug=toy", "data.synthetic.dirt_rate=0"])
    tmp = tmp_path_factory.mktemp("dirty")
    raw = tmp / "raw"
    generate(cfg.data.synthetic, raw)
    clean_rows = {c: read_raw(raw / c).num_rows for c in ("home", "related", "search", "genre")}
    _append_bad_rows(raw / "home", [
        None, None, None,                       # 3 exact duplicates of the first row
        {"video_id": None}, {"video_id": None},
        {"video_id": 999_999}, {"video_id": 888_888}, {"video_id": -1}, {"video_id": 10**9},
        {"play_start": 7},
        {"event_ts": -5}, {"event_ts": None},
        {"event_ts": 2**63 - 1},                # overflows any time unit: a reject, not an abort
        {"event_ts": FAR_FUTURE_S * 1000},      # beyond the horizon (data.max_future_s)
        {"session_id": None},
    ])  # fmt: skip
    _append_bad_rows(raw / "search", [{"result_id": "x9z"}, {"result_id": "12a"}, {"clicked": "maybe"}])
    _append_bad_rows(raw / "related", [{"ts_utc": "not-a-time"}, {"ts_utc": "2100-01-01T00:00:00Z"}])
    _append_bad_rows(raw / "genre", [{"title": None}])
    out = tmp / "prepared"
    counts = build(raw, out, cfg.data, cfg.task, cfg.seed)
    return cfg, out, counts, clean_rows


def test_exact_reject_counts_per_reason(dirty):
    _, out, counts, _ = dirty
    assert counts == {
        "home": {
            "bad_label": 1,
            "bad_timestamp": 4,
            "duplicate": 3,
            "missing:session_id": 1,
            "missing:video_id": 2,
            "unknown_candidate": 4,
        },
        "related": {"bad_timestamp": 2},
        "search": {"bad_label": 1, "bad_type:result_id": 2},
        "genre": {"missing:title": 1},
        "genre_rows": {},
    }
    assert json.loads((out / "rejects.json").read_text()) == counts
    rejects = pq.read_table(out / "rejects" / "task=home")
    assert rejects.num_rows == 15
    row = dict(rejects.filter(pa.compute.equal(rejects["reason"], "bad_label"))["row"][0].as_py())
    assert row["play_start"] == "7"  # the raw value is kept for inspection


def test_every_good_row_arrives(dirty):
    cfg, out, _, clean_rows = dirty
    for task in ("home", "related", "search"):
        labeled = sum(pq.read_table(out / "labeled" / f"split={s}" / f"task={task}").num_rows for s in SPLITS)
        assert labeled == clean_rows[task], task
    genre = sum(pq.read_table(out / "labeled" / f"split={s}" / "task=genre").num_rows for s in SPLITS)
    assert genre == clean_rows["genre"] * (1 + cfg.task["genre"].labels.negatives)


def test_time_split_has_no_leakage(dirty):
    _, out, _, _ = dirty
    tasks = ("home", "related", "search", "genre")
    t = {(s, k): pq.read_table(out / "labeled" / f"split={s}" / f"task={k}") for s in SPLITS for k in tasks}
    # One pair of cut-offs for every task: no task trains on another task's validation or test period.
    last_train = max(t["train", k][TIMESTAMP].to_numpy().max() for k in tasks)
    first_valid = min(t["valid", k][TIMESTAMP].to_numpy().min() for k in tasks)
    last_valid = max(t["valid", k][TIMESTAMP].to_numpy().max() for k in tasks)
    first_test = min(t["test", k][TIMESTAMP].to_numpy().min() for k in tasks)
    assert last_train < first_valid and last_valid < first_test
    for k in tasks:
        ids = [set(t[s, k][REQUEST].to_pylist()) for s in SPLITS]
        assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])


def test_sampled_negatives_never_the_positive(dirty):
    _, out, _, _ = dirty
    t = pq.read_table(out / "labeled" / "split=train" / "task=genre").to_pydict()
    pos = {(r, c) for r, c, y in zip(t[REQUEST], t["candidate"], t["label"]) if y == 1}
    neg = {(r, c) for r, c, y in zip(t[REQUEST], t["candidate"], t["label"]) if y == 0}
    assert pos and neg and not (pos & neg)


def test_stratified_merge_rate_and_cap():
    import numpy as np

    from unirec.data.labels import downsample

    cfg = compose(["debug=toy"])
    task = cfg.task["home"]
    table = pa.table({REQUEST: np.repeat(np.arange(100), 3), "label": np.zeros(300)})
    task.train_rate = 0.5
    assert len(set(downsample(table, task, 0)[REQUEST].to_pylist())) == 50
    task.max_train_requests = 20
    kept = downsample(table, task, 0)
    assert len(set(kept[REQUEST].to_pylist())) == 20 and kept.num_rows == 60  # whole requests are kept


def test_wrong_timestamp_unit_names_the_column():
    cfg = compose(["debug=toy"])
    task = cfg.task["related"]
    task.adapter.timestamp_unit = "s"  # but ts_utc holds ISO text
    raw = pa.table({"anchor_video": [1], "shown_video": [2], "click": [True], "ts_utc": ["2023-11-14T22:13:20Z"],
                    "country": ["us"], "req": ["r1"]})  # fmt: skip
    from unirec.data.labels import clean_batch

    with pytest.raises(TypeError, match=r"related\.ts_utc holds string.*timestamp_unit=iso"):
        clean_batch(raw, task, pa.array([1, 2]))


def test_malformed_dense_context_values_are_rejects_not_crashes():
    from unirec.config import FieldConfig
    from unirec.data.labels import clean_batch, count_reasons

    task = compose(["debug=toy"]).task["home"]
    task.context["watch_hours"] = FieldConfig(kind="dense")
    task.adapter.context["watch_hours"] = "hours"
    raw = pa.table({
        "member_id": [1, 2, 3, 4], "country_code": ["us"] * 4, "ui_lang": ["en"] * 4, "video_id": [1, 2, 3, 4],
        "play_start": pa.array([0, 1, 0, 1], pa.int8()), "event_ts": [1_700_000_000_000] * 4,
        "session_id": ["a", "a", "b", "b"], "row_pos": [0, 1, 0, 1], "hours": ["1.5", "abc", None, "2e3"],
    })  # fmt: skip
    cleaned = clean_batch(raw, task, pa.array([1, 2, 3, 4]))
    assert count_reasons(cleaned.rejects) == {"bad_type:hours": 1}
    assert cleaned.good["hours"].to_pylist() == ["1.5", None, "2e3"]


def _home_rows(ts) -> pa.Table:
    n = len(ts)
    return pa.table({
        "member_id": list(range(n)), "country_code": ["us"] * n, "ui_lang": ["en"] * n,
        "video_id": [1] * n, "play_start": pa.array([1] * n, pa.int8()), "event_ts": pa.array(ts, pa.int64()),
        "session_id": [str(i) for i in range(n)], "row_pos": [0] * n,
    })  # fmt: skip


def test_the_horizon_is_a_rule_applied_to_one_fixed_now():
    from unirec.data.labels import clean_batch, count_reasons

    task = compose(["debug=toy"]).task["home"]
    now = 1_700_000_000
    raw = _home_rows([now * 1000, (now + 86_400) * 1000, (now + 86_401) * 1000, 2**63 - 1, -(2**63)])
    cleaned = clean_batch(raw, task, pa.array([1]), latest=now + 86_400)
    assert count_reasons(cleaned.rejects) == {"bad_timestamp": 3}
    assert cleaned.good["__ts"].to_pylist() == [now, now + 86_400]
    # no horizon (data.max_future_s=null): the far-future row is kept, the overflowing ones never
    assert clean_batch(raw, task, pa.array([1])).good.num_rows == 3


def test_a_list_or_struct_column_where_a_scalar_is_wanted_names_the_log_and_column():
    from unirec.data.labels import clean_batch

    task = compose(["debug=toy"]).task["home"]
    raw = _home_rows([1_700_000_000_000] * 2)
    listed = raw.set_column(1, "country_code", pa.array([["us"], ["de"]]))
    with pytest.raises(TypeError, match=r"raw log 'home'.*'country_code' \(adapter.context.country\).*list"):
        clean_batch(listed, task, pa.array([1]))
    structs = raw.set_column(3, "video_id", pa.array([{"id": 1}, {"id": 2}]))
    with pytest.raises(TypeError, match=r"raw log 'home'.*'video_id' \(adapter.candidate\).*struct"):
        clean_batch(structs, task, pa.array([1]))
