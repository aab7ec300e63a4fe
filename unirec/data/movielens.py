"""MovieLens-100K: read either public layout, and derive the four unirec canvases from its ratings.

Reading (:func:`load`). Both layouts become the same three Arrow tables (:data:`RATINGS`, :data:`USERS`,
:data:`ITEMS` give their schemas); users and items sorted by key, ratings by (user, timestamp) with
ties in the file's row order:

- GroupLens (``u.data`` tab-separated ``user item rating timestamp``; ``u.user`` and ``u.item``
  ``|``-separated, latin-1). The title's trailing ``(YYYY)`` becomes ``year`` (the title year, as RecBole
  has it; ``u.item``'s release date is the video release and is not used), the 19 genre flags become
  ``genres``.
- RecBole atomic files (``ml-100k.inter``, ``ml-100k.user``, ``ml-100k.item``: tab-separated, UTF-8, typed
  headers such as ``user_id:token``), e.g. the copy the ``recbole==1.2.1`` wheel ships.

The one item without a title (id 267: ``unknown`` in GroupLens, ``unkonwn`` in RecBole) gets a null title
and year in both.

The canvas derivation (:func:`derive`), fixed and seeded; ``seed`` is the run's ``seed``:

1. Every rating is a positive engagement (implicit feedback; the rating value is not used). Each user's
   events are sorted stably by timestamp, ties kept in the file's row order (:func:`file_order`, the
   standard leave-one-out order): the last is ``test``, the second-to-last ``valid``, the rest
   ``train`` (leave-last-out; the split is written into every row's ``split`` column and honoured by the
   label pipeline instead of its time cut-offs). An event's position in that order within its user
   (0, 1, 2, ...) is its ``event_order``, written into every row (negatives carry their request's): it
   breaks ties of equal timestamps the same way in the point-in-time history join
   (:mod:`unirec.data.history`), so a request's history holds exactly the user's earlier events.
2. Each train event goes to one canvas by a seeded hash of (user, item): ``home`` 40 %, ``related`` 25 %,
   ``search`` 20 %, ``genre`` 15 %; a user's first event (no previous event) always goes to ``home``.
   Each valid and test event yields one request on *every* canvas, so every task is evaluated on every user.
3. Contexts: ``home`` = user + age bucket, gender, occupation; ``related`` = source item (the user's
   previous item), no user; ``search`` = query text + user, the query being one of the target's genres
   (lower-case), its release decade (``1990s``) and, with probability 0.25, one word of its title;
   ``genre`` = one of the target's genres (lower-case) + user. Every choice is a seeded hash of
   (seed, user, item), so an event's context does not depend on the rest of the data.
4. Negatives, written as logged rows with ``label`` 0 (the tasks read them as impressions):
   train requests get ``negatives`` items per positive, uniform over the catalogue or popularity-weighted
   (train counts), never an item the user has in train when the canvas has a user (``related``: never the
   positive). Valid and test requests get ``eval_negatives`` items the user never interacted with, uniform
   and shared by the event's four requests: the sampled (NCF-style) protocol, so the validation metrics of
   training are its HR@10 / NDCG@10 when ``eval_negatives`` is 100.

Output directory: ``items.parquet`` (``item_id, title, genres, year``), ``users.parquet``,
``<canvas>/part-00000.parquet`` per canvas with its own columns (see :data:`CANVAS_COLUMNS`),
``interactions.parquet`` (``user_id, item_id, timestamp, split, event_order`` of every event: the
interaction history that full-ranking evaluation removes from a user's ranking, and the events of the
history join) and ``derivation.json`` (the settings and counts). ``python -m unirec.data.movielens SRC OUT``
writes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
"""The genre flags of ``u.item``, in column order (RecBole's ``class`` lists them in the same order)."""

RATINGS = pa.schema(
    [("user_id", pa.int64()), ("item_id", pa.int64()), ("rating", pa.int8()), ("timestamp", pa.int64())]
)
USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("age", pa.int32()),
        ("gender", pa.string()),
        ("occupation", pa.string()),
        ("zip_code", pa.string()),
    ]
)
ITEMS = pa.schema(
    [("item_id", pa.int64()), ("title", pa.string()), ("year", pa.int32()), ("genres", pa.list_(pa.string()))]
)

CANVASES = ("home", "related", "search", "genre")
SHARES = (0.40, 0.25, 0.20, 0.15)
"""Share of train events per canvas, in :data:`CANVASES` order."""
CANVAS_COLUMNS = {
    "home": ("request_id", "user_id", "age_bucket", "gender", "occupation"),
    "related": ("request_id", "source_item_id"),
    "search": ("request_id", "user_id", "query"),
    "genre": ("request_id", "user_id", "genre"),
}
"""Each canvas log's context columns; every log also has ``item_id, label, timestamp, split, event_order``
(negatives carry their request's event's order)."""
INTERACTIONS = "interactions.parquet"
"""Every event of the derivation with its split; see :func:`unirec.ranking.seen_items`."""
AGE_BUCKETS = ((18, "under18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
"""(upper bound exclusive, name); 56 and older is ``56+`` (the MovieLens-1M buckets)."""
_NO_TITLE = ("unknown", "unkonwn")  # item 267 in GroupLens / RecBole
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})\)\s*$")
_WORD = re.compile(r"[^\W_]+")  # the feature tokenizer's words: runs of letters or digits
# Hash streams: one per independent choice, so changing one never moves another.
_S_CANVAS, _S_SEARCH_GENRE, _S_TITLE_P, _S_TITLE_WORD, _S_GENRE = 1, 2, 3, 4, 5


@dataclass
class MovieLensConfig:
    """Knobs of the canvas derivation (the defaults are the documented derivation)."""

    negatives: int = 4
    """Sampled negatives per train positive."""
    negative_sampling: str = "uniform"
    """uniform over the catalogue, or popularity (proportional to train counts)."""
    eval_negatives: int = 100
    """Negatives per valid/test event: items the user never interacted with, uniform."""
    title_word_prob: float = 0.25
    """Probability that a search query carries one word of the target's title."""


@dataclass(frozen=True)
class MovieLens:
    """The three tables of MovieLens-100K, whichever layout they came from."""

    ratings: pa.Table
    users: pa.Table
    items: pa.Table


# ----------------------------------------------------------------------------------------------- reading


def find_layout(path) -> Tuple[str, Path]:
    """("grouplens" | "recbole", the directory holding the files) for ``path`` or its one subdirectory."""
    root = Path(path).expanduser()
    for d in [root, *sorted(p for p in root.glob("*") if p.is_dir())] if root.is_dir() else []:
        if (d / "u.data").is_file():
            return "grouplens", d
        if (d / "ml-100k.inter").is_file():
            return "recbole", d
    raise FileNotFoundError(
        f"no MovieLens-100K files under {root}: expected u.data/u.user/u.item (GroupLens) or "
        "ml-100k.inter/.user/.item (RecBole); fetch them with scripts/fetch_movielens.py"
    )


_FILES = {
    "grouplens": ("u.data", "u.user", "u.item"),
    "recbole": ("ml-100k.inter", "ml-100k.user", "ml-100k.item"),
}


def source_files(path) -> List[Path]:
    """The files :func:`load` reads from ``path`` (ratings, users, items), for the prepared data's key."""
    layout, d = find_layout(path)
    return [d / name for name in _FILES[layout]]


def load(path) -> MovieLens:
    """Read MovieLens-100K from ``path`` in either layout (detected by its files)."""
    layout, d = find_layout(path)
    return load_grouplens(d) if layout == "grouplens" else load_recbole(d)


def load_grouplens(d) -> MovieLens:
    d = Path(d)
    r = _read_text(d / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"], "latin-1")
    u = _read_text(d / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip_code"], "latin-1")
    names = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES]
    it = _read_text(d / "u.item", "|", names, "latin-1")
    titles, years = [], []
    for raw in it["title"].to_pylist():
        m = _TITLE_YEAR.match(raw or "")
        titles.append(m.group(1) if m else (raw or "").strip())
        years.append(int(m.group(2)) if m else None)
    flags = np.stack([np.asarray(it[g].to_pylist(), dtype=object) == "1" for g in GENRES], axis=1)
    genres = [[g for g, on in zip(GENRES, row) if on] for row in flags]
    return _finish(r, u, it["item_id"], titles, years, genres)


def load_recbole(d) -> MovieLens:
    d = Path(d)
    r = _read_text(d / "ml-100k.inter", "\t", None, "utf8")
    u = _read_text(d / "ml-100k.user", "\t", None, "utf8")
    it = _read_text(d / "ml-100k.item", "\t", None, "utf8")
    titles = [(t or "").strip() for t in it["movie_title"].to_pylist()]
    years = [int(y) if y and y.strip().isdigit() else None for y in it["release_year"].to_pylist()]
    genres = [(c or "").split() for c in it["class"].to_pylist()]
    return _finish(r, u, it["item_id"], titles, years, genres)


def _read_text(path: Path, sep: str, names, encoding: str) -> pa.Table:
    """Every column as text. ``names=None``: the first line is a RecBole header (``name:type``)."""
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens file {path} is missing")
    read = pacsv.ReadOptions(
        column_names=names, encoding=encoding, autogenerate_column_names=False, block_size=1 << 22
    )
    if names is None:
        header = path.read_text(encoding=encoding).split("\n", 1)[0].rstrip("\r")
        read = pacsv.ReadOptions(
            column_names=[h.split(":")[0] for h in header.split(sep)], skip_rows=1, encoding=encoding
        )
    parse = pacsv.ParseOptions(delimiter=sep, quote_char=False, escape_char=False)
    conv = pacsv.ConvertOptions(
        column_types={n: pa.string() for n in (read.column_names or [])},
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    return pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=conv)


def _ints(col, t: pa.DataType) -> pa.Array:
    """Text ids/numbers to ``t``; "3.0"-style floats (RecBole's ``rating:float``) must be integral."""
    txt = pc.utf8_trim_whitespace(col)
    as_float = pc.cast(txt, pa.float64())
    return pc.cast(as_float, t)  # a safe cast: fractional values raise instead of truncating


def _finish(r: pa.Table, u: pa.Table, item_ids, titles, years, genres) -> MovieLens:
    ratings = pa.table(
        [
            _ints(r["user_id"], pa.int64()),
            _ints(r["item_id"], pa.int64()),
            _ints(r["rating"], pa.int8()),
            _ints(r["timestamp"], pa.int64()),
        ],
        schema=RATINGS,
    )
    ratings = ratings.take(file_order(ratings))
    users = pa.table(
        [
            _ints(u["user_id"], pa.int64()),
            _ints(u["age"], pa.int32()),
            pc.utf8_trim_whitespace(u["gender"]),
            pc.utf8_trim_whitespace(u["occupation"]),
            pc.utf8_trim_whitespace(u["zip_code"]),
        ],
        schema=USERS,
    ).sort_by("user_id")
    missing = [t in _NO_TITLE and y is None for t, y in zip(titles, years)]
    items = pa.table(
        [
            _ints(item_ids, pa.int64()),
            pa.array([None if m else t for t, m in zip(titles, missing)], pa.string()),
            pa.array(years, pa.int32()),
            pa.array(genres, pa.list_(pa.string())),
        ],
        schema=ITEMS,
    ).sort_by("item_id")
    return MovieLens(ratings.combine_chunks(), users.combine_chunks(), items.combine_chunks())


# ------------------------------------------------------------------------------------------- derivation


def age_bucket(age: np.ndarray) -> np.ndarray:
    """The MovieLens-1M age groups as text ("under18", "18-24", ..., "56+")."""
    out = np.full(len(age), "56+", dtype=object)
    for upper, name in reversed(AGE_BUCKETS):
        out[age < upper] = name
    return out


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def event_uniform(seed: int, stream: int, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) per (seed, stream, user, item): a stateless seeded hash (splitmix64)."""
    with np.errstate(over="ignore"):
        h = _splitmix(np.full(len(user), seed, dtype=np.uint64))
        for part in (np.full(len(user), stream), user, item):
            h = _splitmix(h ^ np.asarray(part).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def assign_canvas(seed: int, user: np.ndarray, item: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Canvas index (into :data:`CANVASES`) of train events; a user's first event goes to home."""
    u = event_uniform(seed, _S_CANVAS, user, item)
    canvas = np.searchsorted(np.cumsum(SHARES)[:-1], u, side="right")
    return np.where(first, 0, canvas).astype(np.int8)


def file_order(ratings: pa.Table) -> np.ndarray:
    """Row indices that sort ``ratings`` by (user, timestamp), ties kept in the file's row order.

    This is the standard leave-one-out order (RecBole's): MovieLens holds many events within one second,
    and breaking those ties by item id instead would move 282 of the 943 test events.
    """
    rows = np.arange(ratings.num_rows)
    return np.lexsort((rows, ratings["timestamp"].to_numpy(), ratings["user_id"].to_numpy()))


def split_events(ratings: pa.Table) -> Dict[str, np.ndarray]:
    """Events in :func:`file_order` with position (``event_order``), previous item and split."""
    t = ratings.take(file_order(ratings))
    user, item, ts = (t[c].to_numpy() for c in ("user_id", "item_id", "timestamp"))
    start = np.r_[0, np.flatnonzero(user[1:] != user[:-1]) + 1]
    count = np.diff(np.r_[start, len(user)])
    pos = np.arange(len(user)) - np.repeat(start, count)
    from_end = np.repeat(count, count) - 1 - pos
    split = np.where(from_end == 0, "test", np.where(from_end == 1, "valid", "train")).astype(object)
    prev = np.r_[-1, item[:-1]]
    prev[pos == 0] = -1
    return dict(user=user, item=item, ts=ts, pos=pos, split=split, prev=prev)


def derive(ml: MovieLens, out, seed: int, cfg: Optional[MovieLensConfig] = None) -> Dict:
    """Write the four canvas logs, ``items.parquet`` and ``users.parquet`` under ``out``; returns a summary."""
    cfg = cfg or MovieLensConfig()
    if cfg.negative_sampling not in ("uniform", "popularity"):
        raise ValueError(f"negative_sampling must be uniform or popularity, got {cfg.negative_sampling!r}")
    out = Path(out)
    ev = split_events(ml.ratings)
    n_ev = len(ev["user"])
    train = ev["split"] == "train"

    # Requests: (event, canvas) pairs; one per train event, four per valid/test event.
    canvas_of = assign_canvas(seed, ev["user"], ev["item"], ev["pos"] == 0)
    req_event = np.r_[np.flatnonzero(train), np.repeat(np.flatnonzero(~train), 4)]
    req_canvas = np.r_[canvas_of[train], np.tile(np.arange(4, dtype=np.int8), int((~train).sum()))]
    order = np.lexsort((req_canvas, req_event))
    req_event, req_canvas = req_event[order], req_canvas[order]
    req_id = req_event.astype(np.int64) * 4 + req_canvas

    cat = ml.items["item_id"].to_numpy()
    n_items = len(cat)
    item_idx = np.searchsorted(cat, ev["item"])
    if np.any(item_idx >= n_items) or np.any(cat[np.minimum(item_idx, n_items - 1)] != ev["item"]):
        raise ValueError("ratings name items missing from the item table")
    users_sorted = np.unique(ev["user"])
    user_idx = np.searchsorted(users_sorted, ev["user"])

    # Negatives: item indices per request (-1 where none could be drawn).
    neg_rows, neg_items = _train_negatives(
        cfg, seed, req_event, req_canvas, train, user_idx, item_idx, n_items
    )
    e_rows, e_items = _eval_negatives(cfg, seed, req_event, train, user_idx, item_idx, n_items)
    rows = np.r_[np.arange(len(req_id)), neg_rows, e_rows]
    cand = np.r_[item_idx[req_event], neg_items, e_items]
    label = np.r_[np.ones(len(req_id), np.int8), np.zeros(len(neg_rows) + len(e_rows), np.int8)]
    order = np.lexsort((np.arange(len(rows)), -label, rows))  # positive first, then draw order
    rows, cand, label = rows[order], cand[order], label[order]

    contexts = _contexts(ml, ev, seed, cfg)
    summary: Dict = {"seed": seed, "config": asdict(cfg), "canvases": {}}
    for c, name in enumerate(CANVASES):
        sel = req_canvas[rows] == c
        r, e = rows[sel], req_event[rows[sel]]
        cols = {"request_id": pa.array(req_id[r])}
        for col in CANVAS_COLUMNS[name][1:]:
            cols[col] = contexts[col].take(pa.array(e))
        cols["item_id"] = pa.array(cat[cand[sel]])
        cols["label"] = pa.array(label[sel])
        cols["timestamp"] = pa.array(ev["ts"][e])
        cols["split"] = pa.array(ev["split"][e], pa.string())
        cols["event_order"] = pa.array(ev["pos"][e], pa.int64())
        table = pa.table(cols)
        _write(table, out / name / "part-00000.parquet")
        by_split = {
            s: int(((ev["split"][e] == s) & (label[sel] == 1)).sum()) for s in ("train", "valid", "test")
        }
        summary["canvases"][name] = {"rows": table.num_rows, "requests": by_split}
    items = ml.items
    genres_txt = [("|".join(g).lower() if g else None) for g in items["genres"].to_pylist()]
    _write(
        pa.table(
            {
                "item_id": items["item_id"],
                "title": items["title"],
                "genres": pa.array(genres_txt, pa.string()),
                "year": items["year"],
            }
        ),
        out / "items.parquet",
    )
    _write(ml.users, out / "users.parquet")
    # Every event with its split: the full-ranking protocol removes a user's train items from the ranking,
    # including those of the related canvas, whose requests carry no user.
    history = {"user_id": ev["user"], "item_id": ev["item"], "timestamp": ev["ts"]}
    split = pa.array(ev["split"], pa.string())
    _write(
        pa.table({**history, "split": split, "event_order": pa.array(ev["pos"], pa.int64())}),
        out / INTERACTIONS,
    )
    summary.update(users=int(len(users_sorted)), items=int(n_items), events=int(n_ev))
    (out / "derivation.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def _contexts(
    ml: MovieLens, ev: Dict[str, np.ndarray], seed: int, cfg: MovieLensConfig
) -> Dict[str, pa.Array]:
    """Every context column, one value per event (each canvas takes the columns it logs)."""
    user, item = ev["user"], ev["item"]
    users = ml.users
    urow = pc.index_in(pa.array(user), value_set=users["user_id"])

    def user_col(name: str) -> pa.Array:
        return users[name].combine_chunks().take(urow)

    ages = user_col("age")
    bucket = age_bucket(pc.fill_null(ages, 0).to_numpy(zero_copy_only=False))
    bucket = pa.array(bucket, pa.string(), mask=np.asarray(pc.is_null(ages), dtype=bool))

    items = ml.items
    irow = np.searchsorted(items["item_id"].to_numpy(), item)
    genres = [[g.lower() for g in gs] for gs in items["genres"].to_pylist()]
    words = [_WORD.findall(t.lower()) if t else [] for t in items["title"].to_pylist()]
    years = items["year"].to_pylist()

    def pick(options, u: float):
        return options[int(u * len(options))] if options else None

    u_sg = event_uniform(seed, _S_SEARCH_GENRE, user, item)
    u_tp = event_uniform(seed, _S_TITLE_P, user, item)
    u_tw = event_uniform(seed, _S_TITLE_WORD, user, item)
    u_g = event_uniform(seed, _S_GENRE, user, item)
    query, genre = [], []
    for k, r in enumerate(irow):
        parts = [pick(genres[r], u_sg[k])]
        if years[r] is not None:
            parts.append(f"{years[r] // 10 * 10}s")
        if u_tp[k] < cfg.title_word_prob:
            parts.append(pick(words[r], u_tw[k]))
        query.append(" ".join(p for p in parts if p) or None)
        genre.append(pick(genres[r], u_g[k]))
    prev = ev["prev"]
    return {
        "user_id": pa.array(user),
        "age_bucket": bucket,
        "gender": user_col("gender"),
        "occupation": user_col("occupation"),
        "source_item_id": pa.array(prev, mask=prev < 0),
        "query": pa.array(query, pa.string()),
        "genre": pa.array(genre, pa.string()),
    }


def _train_negatives(cfg, seed, req_event, req_canvas, train, user_idx, item_idx, n_items):
    """``cfg.negatives`` draws per train request, never the user's train items (with a user in the
    context) or the positive (related); within a request no item twice. Returns (request row, item index)."""
    k = cfg.negatives
    rows = np.flatnonzero(train[req_event])
    if k <= 0 or len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 7919])
    if cfg.negative_sampling == "popularity":
        p = np.bincount(item_idx[train], minlength=n_items).astype(np.float64)
        p /= p.sum()

        def draw(n):
            return rng.choice(n_items, size=n, p=p)
    else:

        def draw(n):
            return rng.integers(0, n_items, size=n)

    ev = req_event[rows]
    has_user = req_canvas[rows] != CANVASES.index("related")
    seen = np.unique(user_idx[train] * n_items + item_idx[train])  # the users' train items
    u_key = user_idx[ev][:, None] * n_items
    d = draw(len(rows) * k).reshape(len(rows), k)
    for _ in range(64):
        bad = np.where(has_user[:, None], np.isin(u_key + d, seen), d == item_idx[ev][:, None])
        for j in range(1, k):
            bad[:, j] |= (d[:, :j] == d[:, j : j + 1]).any(axis=1)
        if not bad.any():
            break
        d[bad] = draw(int(bad.sum()))
    else:  # a user who has nearly the whole catalogue in train: drop what still clashes
        d[bad] = -1
    r = np.repeat(rows, k)
    d = d.ravel()
    return r[d >= 0], d[d >= 0]


def _eval_negatives(cfg, seed, req_event, train, user_idx, item_idx, n_items):
    """``cfg.eval_negatives`` items the user never interacted with per valid/test event, uniform without
    replacement, shared by the event's requests. Returns (request row, item index)."""
    k = cfg.eval_negatives
    events = np.flatnonzero(~train)
    if k <= 0 or len(events) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 104729])
    order = np.argsort(user_idx, kind="stable")
    bounds = np.searchsorted(user_idx[order], np.arange(user_idx.max() + 2))
    per_event = {}
    for e in events:  # one draw per valid/test event (two per user): a short loop
        u = user_idx[e]
        interacted = item_idx[order[bounds[u] : bounds[u + 1]]]
        pool = np.setdiff1d(np.arange(n_items), interacted, assume_unique=False)
        per_event[e] = rng.choice(pool, size=min(k, len(pool)), replace=False)
    rows = np.flatnonzero(~train[req_event])
    counts = np.array([len(per_event[req_event[r]]) for r in rows], dtype=np.int64)
    items = np.concatenate([per_event[req_event[r]] for r in rows]) if len(rows) else np.zeros(0, np.int64)
    return np.repeat(rows, counts), items.astype(np.int64)


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=65_536)


def main(argv=None) -> None:
    """``python -m unirec.data.movielens SRC OUT [--seed N]``: derive the canvas logs once, e.g. to use them
    as ``data.name=raw data.raw_dir=OUT`` with the ``movielens/*`` tasks."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("src", help="MovieLens-100K directory (GroupLens or RecBole layout)")
    ap.add_argument("out", help="output directory of the canvas logs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(derive(load(args.src), args.out, args.seed), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
