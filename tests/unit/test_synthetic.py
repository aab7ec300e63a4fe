"""The synthetic generator is the ground truth of every later stage, so its contracts are pinned here:
reproducibility, exact per-canvas schemas, clean-row invariants, and dirt that is counted exactly and
never disturbs the clean rows."""

import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unirec.data import synthetic
from unirec.data.synthetic import CANVASES, COUNTRIES, GENRES, LANGUAGES, WORDS, generate
from unirec.data.synthetic_config import SyntheticConfig

TINY = dict(
    n_users=60, n_items=80, requests_per_task=240, slate_min=3, slate_max=7, days=3, chunk_requests=100
)
REQUEST = {
    "home": "session_id",
    "related": "req",
    "search": "search_id",
    "genre": "page_id",
    "rows": "page_view",
}
CANDIDATE = {"home": "video_id", "related": "shown_video", "search": "result_id", "genre": "title"}
CANDIDATE["rows"] = "row_genre"
TIMESTAMP = {"home": "event_ts", "related": "ts_utc", "search": "timestamp_s", "genre": "ts", "rows": "ts_ms"}
EXPECTED_SCHEMAS = {
    "home": [("member_id", pa.int64()), ("country_code", pa.string()), ("ui_lang", pa.string()),
             ("video_id", pa.int64()), ("play_start", pa.int8()), ("event_ts", pa.int64()),
             ("session_id", pa.string()), ("row_pos", pa.int16())],
    "related": [("anchor_video", pa.int64()), ("shown_video", pa.int64()), ("click", pa.bool_()),
                ("ts_utc", pa.string()), ("country", pa.string()), ("req", pa.string())],
    "search": [("query", pa.string()), ("profile", pa.int64()), ("result_id", pa.string()),
               ("clicked", pa.string()), ("timestamp_s", pa.float64()), ("search_id", pa.int64()),
               ("lang", pa.string())],
    "genre": [("genre_row", pa.string()), ("account_id", pa.int64()), ("title", pa.int64()),
              ("ts", pa.int64()), ("page_id", pa.int64())],
    "rows": [("profile_id", pa.int64()), ("row_genre", pa.string()), ("clicked", pa.int8()),
             ("ts_ms", pa.int64()), ("page_view", pa.string()), ("country", pa.string())],
}  # fmt: skip


def _cfg(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{**TINY, "dirt_rate": 0.05, **kw})


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> tuple[SyntheticConfig, Path, dict]:
    cfg, out = _cfg(), tmp_path_factory.mktemp("dirty")
    return cfg, out, generate(cfg, out)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[SyntheticConfig, Path, dict]:
    cfg, out = _cfg(dirt_rate=0.0), tmp_path_factory.mktemp("clean")
    return cfg, out, generate(cfg, out)


def _read(out: Path, canvas: str) -> pa.Table:
    parts = sorted((out / canvas).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def _rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))


def _seconds(canvas: str, value) -> float | None:
    """Event time in epoch seconds, or None where it is missing or unparseable."""
    if value is None:
        return None
    if canvas == "related":
        try:
            return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            return None
    return value / 1000 if canvas in ("home", "rows") else value


def _defects(cfg: SyntheticConfig, canvas: str, row: dict) -> set[str]:
    """Every defect kind a row shows, judged only from the file (what a cleaning step would see)."""
    found, cand = set(), row[CANDIDATE[canvas]]
    if cand is None:
        found.add("null_candidate")
    elif canvas == "rows":
        if cand not in GENRES:
            found.add("unknown_candidate")
    elif canvas == "search" and not cand.isdigit():
        found.add("bad_type")
    elif not 1 <= int(cand) <= cfg.n_items:
        found.add("unknown_candidate")
    t = _seconds(canvas, row[TIMESTAMP[canvas]])
    if t is None or not cfg.start_time <= t < cfg.start_time + cfg.days * 86400:
        found.add("bad_timestamp")
    label = {"home": "play_start", "related": "click", "search": "clicked", "rows": "clicked"}.get(canvas)
    valid = {"home": (0, 1), "related": (True, False), "search": ("0", "1"), "rows": (0, 1)}
    if label and row[label] not in valid[canvas]:
        found.add("bad_label")
    return found


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path, dirty):
    cfg, out, _ = dirty
    generate(cfg, tmp_path / "again")
    generate(_cfg(seed=1), tmp_path / "other")
    assert _files(tmp_path / "again") == _files(out)
    other = _files(tmp_path / "other")
    assert other.keys() == _files(out).keys()
    assert all(other[k] != v for k, v in _files(out).items())


def test_canvas_schemas_are_exact(dirty):
    _, out, _ = dirty
    for canvas in CANVASES:
        assert _read(out, canvas).schema.remove_metadata() == pa.schema(EXPECTED_SCHEMAS[canvas])


def test_catalogue_and_users(dirty):
    cfg, out, summary = dirty
    items, users = pq.read_table(out / "items.parquet"), pq.read_table(out / "users.parquet")
    assert items.schema.names == ["item_id", "title", "genres", "year"] and items["year"].type == pa.int32()
    assert items["item_id"].to_pylist() == list(range(1, cfg.n_items + 1))
    assert all(2 <= len(t.split()) <= 4 and set(t.split()) <= set(WORDS) for t in items["title"].to_pylist())
    for genres in items["genres"].to_pylist():
        names = genres.split("|")
        assert 1 <= len(names) <= 3 and len(set(names)) == len(names) and set(names) <= set(GENRES)
    assert all(1950 <= y <= 2024 for y in items["year"].to_pylist())
    assert users["user_id"].to_pylist() == list(range(1, cfg.n_users + 1))
    assert set(users["country"].to_pylist()) <= set(COUNTRIES)
    assert set(users["language"].to_pylist()) <= set(LANGUAGES)
    assert (summary["items"], summary["users"]) == (cfg.n_items, cfg.n_users)
    assert len(GENRES) == 12 and len(set(WORDS)) == len(WORDS) >= 150


def test_clean_rows_are_valid_and_slates_within_bounds(clean):
    cfg, out, summary = clean
    for canvas in CANVASES:
        table = _read(out, canvas)
        rows = table.to_pylist()
        assert summary["canvases"][canvas]["rows"] == len(rows)
        assert all(not _defects(cfg, canvas, row) for row in rows), canvas
        by_request = Counter(row[REQUEST[canvas]] for row in rows)
        assert summary["canvases"][canvas]["requests"] == len(by_request)
        low, high = {"genre": (1, cfg.slate_max), "rows": synthetic._ROWS_SHOWN}.get(
            canvas, (cfg.slate_min, cfg.slate_max)
        )
        assert all(low <= n <= high for n in by_request.values()), canvas
        times = {(row[REQUEST[canvas]], row[TIMESTAMP[canvas]]) for row in rows}
        assert len(times) == len(by_request), f"{canvas}: a request has several timestamps"
        assert len(set(_rows(table))) == len(rows), f"{canvas}: duplicates in clean logs"
    assert summary["canvases"]["home"]["requests"] == cfg.requests_per_task
    home = _read(out, "home").to_pylist()
    positions = {}
    for row in home:
        positions.setdefault(row["session_id"], []).append(row["row_pos"])
    assert all(p == list(range(len(p))) for p in positions.values())


def test_genre_rows_rank_genres_and_follow_the_users_taste(clean):
    """The rows canvas shows each genre at most once per page, from the genre catalogue, and clicks follow
    the ground-truth relevance: clicked rows are more relevant than unclicked ones on average."""
    cfg, out, _ = clean
    genres = pq.read_table(out / "genres.parquet")
    assert genres["genre"].to_pylist() == list(GENRES)
    rows = _read(out, "rows").to_pylist()
    pages = Counter((r["page_view"], r["row_genre"]) for r in rows)
    assert max(pages.values()) == 1 and {r["row_genre"] for r in rows} <= set(GENRES)
    w = synthetic._build_world(cfg)
    g = {name: i for i, name in enumerate(GENRES)}
    rel = np.array([w.taste["rows"][r["profile_id"] - 1] @ w.centroids[g[r["row_genre"]]] for r in rows])
    clicked = np.array([r["clicked"] == 1 for r in rows])
    assert 0.03 < clicked.mean() < 0.4
    assert rel[clicked].mean() > rel[~clicked].mean() + 0.2


def test_search_queries_mix_genre_and_title_words(clean):
    _, out, _ = clean
    for query in set(_read(out, "search")["query"].to_pylist()):
        words = query.split()
        assert 1 <= len(words) <= 3 and set(words) <= set(GENRES) | set(WORDS), query


def test_genre_log_holds_only_positives(clean):
    cfg, out, _ = clean
    rng = np.random.default_rng([cfg.seed, CANVASES.index("genre"), 0, 0])
    n = min(cfg.chunk_requests, cfg.requests_per_task)
    sim = synthetic._simulate(synthetic._build_world(cfg), cfg, "genre", rng, n)
    r, p = np.nonzero(sim["shown"] & sim["click"])
    page = synthetic._request_ids(cfg, "genre", 0, n)
    expected = set(zip(page[r].tolist(), (sim["items"][r, p] + 1).tolist(), strict=True))
    first = pq.read_table(out / "genre" / "part-00000.parquet")
    assert set(zip(first["page_id"].to_pylist(), first["title"].to_pylist(), strict=True)) == expected
    assert len(expected) < sim["shown"].sum()  # negatives really were left out


def test_dirt_counts_match_files(dirty):
    cfg, out, summary = dirty
    for canvas in CANVASES:
        table, stats = _read(out, canvas), summary["canvases"][canvas]
        rows = table.to_pylist()
        found = Counter(kind for row in rows for kind in _defects(cfg, canvas, row))
        found["duplicate"] = len(rows) - len(set(_rows(table)))
        assert dict(+found) == {k: v for k, v in stats["dirt"].items() if v}, canvas
        assert all(len(_defects(cfg, canvas, row)) <= 1 for row in rows)
        assert stats["rows"] == len(rows) and sum(stats["dirt"].values()) > 0
        assert 0.02 < sum(stats["dirt"].values()) / len(rows) < 0.09, canvas
    assert set(summary["canvases"]["search"]["dirt"]) == {
        "duplicate", "null_candidate", "unknown_candidate", "bad_timestamp", "bad_label", "bad_type"
    }  # fmt: skip
    assert "bad_label" not in summary["canvases"]["genre"]["dirt"]


def test_dirty_rows_share_a_real_request_and_sit_in_its_part(dirty):
    cfg, out, _ = dirty
    for canvas in CANVASES:
        for part in sorted((out / canvas).glob("part-*.parquet")):
            rows = pq.read_table(part).to_pylist()
            real = {row[REQUEST[canvas]] for row in rows if not _defects(cfg, canvas, row)}
            assert {row[REQUEST[canvas]] for row in rows} == real, f"{canvas} {part.name}"
            keys = [row[REQUEST[canvas]] for row in rows]
            assert len(set(keys)) == sum(1 for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k)


def test_dirt_does_not_change_clean_rows(clean, dirty):
    cfg, dirty_out, _ = dirty
    _, clean_out, _ = clean
    for canvas in CANVASES:
        kept = [row for row in _read(dirty_out, canvas).to_pylist() if not _defects(cfg, canvas, row)]
        expected = _rows(_read(clean_out, canvas))
        assert set(tuple(row.values()) for row in kept) == set(expected), canvas


def test_chunking_writes_several_time_ordered_parts(clean):
    cfg, out, _ = clean
    n_parts = math.ceil(cfg.requests_per_task / cfg.chunk_requests)
    for canvas in CANVASES:
        parts = sorted((out / canvas).glob("part-*.parquet"))
        assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(n_parts)]
    bounds = [pq.read_table(p)["event_ts"].to_pylist() for p in sorted((out / "home").glob("part-*"))]
    assert all(max(a) <= min(b) for a, b in zip(bounds, bounds[1:], strict=False))


def test_regenerating_smaller_removes_stale_parts(tmp_path):
    generate(_cfg(chunk_requests=60), tmp_path)
    generate(_cfg(chunk_requests=1000), tmp_path)
    assert [p.name for p in (tmp_path / "home").glob("part-*.parquet")] == ["part-00000.parquet"]


@pytest.mark.parametrize(("relatedness", "same"), [(1.0, True), (0.0, False)])
def test_relatedness_shares_or_separates_tastes(relatedness, same):
    world = synthetic._build_world(_cfg(n_users=400, relatedness=relatedness))
    home, search = world.taste["home"].ravel(), world.taste["search"].ravel()
    corr = np.corrcoef(home, search)[0, 1]
    assert corr > 0.999 if same else abs(corr) < 0.15


def test_rejects_catalogue_smaller_than_a_slate(tmp_path):
    with pytest.raises(ValueError):
        generate(_cfg(n_items=5, slate_max=7), tmp_path)
