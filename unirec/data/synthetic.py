"""Seeded synthetic logs of a small streaming service, for five recommendation canvases.

The ranking system needs data whose ground truth is known, so that a trained model can be judged against
the best achievable score and against a popularity baseline. This module simulates one latent world
(users with tastes, items with genres, titles and popularity) and logs what a noisy production policy
showed on each canvas and what users did with it. Four canvases rank items (home feed, related items,
search, a genre row's items); the fifth, ``rows``, ranks *genres*: which genre rows the home page shows a
user, so one model learns to rank two kinds of entity. Each canvas is written with its own, deliberately
inconsistent schema (ids as text, labels as strings, several timestamp formats) because the real logs
that the label-preparation code must normalise look like that.

Everything is vectorised per block of requests: the log is generated and written `chunk_requests`
requests at a time, so memory depends on the chunk size and not on the log size. Every chunk draws
from its own seeded stream (clean rows) and a second stream (dirty rows), so files are reproducible
and dirt never changes the clean rows.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unirec.data.synthetic_config import SyntheticConfig

Rng = np.random.Generator

GENRES: tuple[str, ...] = tuple(
    "action adventure animation comedy crime documentary drama family fantasy horror romance thriller".split()
)
COUNTRIES: tuple[str, ...] = ("us", "gb", "in", "br", "mx", "es", "fr", "de")
LANGUAGES: tuple[str, ...] = ("en", "pt", "es", "fr", "de")
CANVASES: tuple[str, ...] = ("home", "related", "search", "genre", "rows")
ITEM_CANVASES: tuple[str, ...] = CANVASES[:4]
"""Canvases whose candidates are items; ``rows`` ranks genres (its candidates are GENRES)."""
# Title vocabulary: 16 words flavoured by each genre (same order as GENRES), so titles carry genre signal.
WORDS: tuple[str, ...] = tuple(
    """blade storm strike fury iron bullet rogue siege steel thunder hunter raid velocity agent fist recon
    quest island jungle voyage treasure summit compass lost horizon canyon atlas expedition river map pirate
    frontier pixel bunny robot dragonfly rainbow toy bubble sprout pebble wiggle doodle moonbeam kitten hopper
    gizmo puddle pickle goofy wacky blunder chaos party uncle prank banana oops disco weekend roommates
    wedding sitcom hiccup heist alibi cartel verdict ledger witness mob shadow badge ransom suspect precinct
    vault informant noir motive planet ocean archive truth portrait frontline harvest climate wild empire
    chronicle inside factory desert voices evidence silence letters promise winter daughter memory bridge
    garden tears reunion legacy crossing homecoming widow orchard chapter puppy holiday grandma backyard
    picnic treehouse sleepover camp snowman cookie sibling carnival pony lemonade attic homework wizard realm
    crown sorcery elf rune oracle phoenix kingdom spell throne myth dragon enchanted griffin amulet haunted
    crypt ritual scream cellar curse demon ghoul coffin possessed hollow midnight asylum wraith bones fog kiss
    paris valentine sunset darling heart serenade blossom honeymoon sweetheart crush dance letter rose
    moonlight vow conspiracy falcon cipher pursuit deadline hostage trap signal target double fugitive
    protocol sniper blackout decoy night""".split()
)
_COUNTRY_WEIGHTS = np.array([0.30, 0.10, 0.15, 0.15, 0.08, 0.07, 0.08, 0.07])
_COUNTRY_LANG = np.array([0, 0, 0, 1, 2, 2, 3, 4])  # main ui language of each country
_DIM = 8  # latent dimension of tastes and items
_BATCH = 4096  # requests simulated at once inside a chunk: bounds the (requests x pool x dim) temporaries
_ROW_GROUP = 1 << 17  # fixed parquet row-group size, part of the byte-for-byte reproducibility
_POS_BIAS = 0.35  # click logit lost per log(1 + position)
# Click model per canvas: (relevance weight, log-popularity weight, intercept), tuned to ~10-20% CTR.
_CLICK = dict(zip(CANVASES, [(2.3, 0.35, -4.1), (1.9, 0.35, -4.5), (1.9, 0.35, -4.4), (1.7, 0.35, -4.5),
                             (1.5, 0.3, -2.8)]))  # fmt: skip
_ROWS_SHOWN = (4, 8)  # genre rows a home page shows (of len(GENRES))
# Logging policy: (relevance weight, log-popularity weight) of its Plackett-Luce (Gumbel top-k) scores.
_LOGGING = (0.6, 0.5)


def _schema(spec: str) -> pa.Schema:
    """'name:type ...' with pyarrow type factory names: keeps the four exact log schemas readable."""
    return pa.schema([(name, getattr(pa, kind)()) for name, kind in (f.split(":") for f in spec.split())])


_HOME = "member_id:int64 country_code:string ui_lang:string video_id:int64 play_start:int8 event_ts:int64"
_RELATED = "anchor_video:int64 shown_video:int64 click:bool_ ts_utc:string country:string req:string"
_SEARCH = "query:string profile:int64 result_id:string clicked:string timestamp_s:float64 search_id:int64"
SCHEMAS: dict[str, pa.Schema] = {
    "home": _schema(_HOME + " session_id:string row_pos:int16"),
    "related": _schema(_RELATED),
    "search": _schema(_SEARCH + " lang:string"),
    "genre": _schema("genre_row:string account_id:int64 title:int64 ts:int64 page_id:int64"),
    "rows": _schema(
        "profile_id:int64 row_genre:string clicked:int8 ts_ms:int64 page_view:string country:string"
    ),
}


class _World(types.SimpleNamespace):
    """The hidden ground truth shared by all canvases; item and user indices are 0-based (files add 1).

    Items: item_genre (primary), item_genres (N, 3; -1 padded), item_gw (N, G genre weights: 1 primary,
    0.5 secondary), item_words (N, 4 title word ids; -1 padded), item_year, logpop (standardised),
    pop_cdf, item_vec (shared space), rel_vec / rel_cluster (related canvas space), by_genre / by_cluster
    (group samplers). Genres: centroids (G, D) in the item space, genre_logpop (standardised log of the
    popularity mass of the genre's items), genre_titles (items whose primary genre it is). Users: user_country, user_lang, user_cdf (activity), and per canvas taste (U, D;
    scaled so taste . item_vec has unit std) and genre_cdf (which genre a user asks for or is shown).
    """


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, axis=-1)
    return c / c[..., -1:]


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw; `cdf` is one distribution (1-d) or one per draw (2-d, one row per u)."""
    if cdf.ndim == 1:
        return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
    return np.minimum((cdf < u[:, None]).sum(axis=1), cdf.shape[1] - 1)


def _groups(labels: np.ndarray, n_groups: int) -> tuple:
    """Items sorted by group with group offsets, so a uniform item of any group is one gather."""
    counts = np.bincount(labels, minlength=n_groups)
    return np.argsort(labels, kind="stable"), np.cumsum(counts) - counts, counts


def _draw_in_group(groups: tuple, g: np.ndarray, rng: Rng) -> np.ndarray:
    order, starts, counts = groups
    u = rng.random(g.shape)
    pick = np.minimum(starts[g] + (u * counts[g]).astype(np.int64), len(order) - 1)
    return np.where(counts[g] > 0, order[pick], order[(u * len(order)).astype(np.int64)])


def _softmax_cdf(logits: np.ndarray, uniform_mix: float) -> np.ndarray:
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = (1 - uniform_mix) * p / p.sum(axis=1, keepdims=True) + uniform_mix / logits.shape[1]
    return _cdf(p)


def _build_items(cfg: SyntheticConfig, rng: Rng, w: _World) -> np.ndarray:
    """Catalogue: genre mix, genre-flavoured titles, Zipf popularity, latent vectors near genre centroids.

    Returns the genre centroids, from which users' genre preferences are derived.
    """
    n, g = cfg.n_items, len(GENRES)
    primary = _draw(_cdf(rng.dirichlet(np.full(g, 5.0))), rng.random(n))
    others = (primary[:, None] + 1 + np.argsort(rng.random((n, g - 1)), axis=1)[:, :2]) % g
    n_extra = _draw(_cdf(np.array([0.5, 0.35, 0.15])), rng.random(n))
    genres = np.concatenate([primary[:, None], np.where(np.arange(2) < n_extra[:, None], others, -1)], 1)
    gw = np.zeros((n, g))
    rows, cols = np.nonzero(genres >= 0)
    gw[rows, genres[rows, cols]] = np.where(cols == 0, 1.0, 0.5)
    flavoured = primary[:, None] * 16 + rng.integers(0, 16, (n, 4))
    words = np.where(rng.random((n, 4)) < 0.5, flavoured, rng.integers(0, len(WORDS), (n, 4)))
    w.item_words = np.where(np.arange(4) < rng.integers(2, 5, n)[:, None], words, -1)
    w.item_year = np.clip(2024 - rng.exponential(14.0, n).astype(np.int64), 1950, 2024).astype(np.int32)
    logpop = -0.9 * np.log1p(rng.permutation(n).astype(np.float64))
    w.logpop, w.pop_cdf = (logpop - logpop.mean()) / logpop.std(), _cdf(np.exp(logpop))
    centroids = rng.normal(size=(g, _DIM))
    centroids -= centroids.mean(axis=0)
    # einsum rather than BLAS matmul throughout: its results do not depend on the machine's BLAS build.
    vec = (
        centroids[primary]
        + 0.3 * np.einsum("ng,gd->nd", gw == 0.5, centroids)
        + 0.4 * rng.normal(size=(n, _DIM))
    )
    cluster = rng.integers(0, g, n)
    private = rng.normal(size=(g, _DIM))[cluster] + 0.6 * rng.normal(size=(n, _DIM))
    rel = np.sqrt(cfg.relatedness) * vec + np.sqrt(1 - cfg.relatedness) * private
    rel -= rel.mean(axis=0)
    pairs = rng.integers(0, n, (2, 4096))
    rel /= np.sqrt(np.std(np.sum(rel[pairs[0]] * rel[pairs[1]], axis=1)))
    w.item_genre, w.item_genres, w.item_gw, w.item_vec = primary, genres, gw, vec
    w.rel_vec, w.rel_cluster = rel.astype(np.float32), cluster
    w.by_genre, w.by_cluster = _groups(primary, g), _groups(cluster, g)
    mass = np.log(np.bincount(primary, weights=np.exp(logpop), minlength=g) + 1e-9)
    w.genre_logpop = (mass - mass.mean()) / (mass.std() or 1.0)
    w.genre_titles = np.bincount(primary, minlength=g)
    w.centroids = centroids
    return centroids


def _build_world(cfg: SyntheticConfig) -> _World:
    """Users get one shared taste plus a private one per canvas, mixed by sqrt(r) / sqrt(1 - r)."""
    if cfg.n_items <= cfg.slate_max or not 1 <= cfg.slate_min <= cfg.slate_max:
        raise ValueError("need 1 <= slate_min <= slate_max < n_items")
    rng = np.random.default_rng([cfg.seed, 1000])
    w = _World(r=cfg.relatedness, taste={}, genre_cdf={})
    centroids = _build_items(cfg, rng, w)
    u = cfg.n_users
    w.user_country = _draw(_cdf(_COUNTRY_WEIGHTS), rng.random(u))
    lang = rng.integers(0, len(LANGUAGES), u)
    w.user_lang = np.where(rng.random(u) < 0.9, _COUNTRY_LANG[w.user_country], lang)
    w.user_cdf = _cdf(rng.lognormal(0.0, 1.0, u))
    shared = rng.normal(size=(u, _DIM)) + 0.5 * rng.normal(size=(len(COUNTRIES), _DIM))[w.user_country]
    pairs = (rng.integers(0, u, 4096), rng.integers(0, cfg.n_items, 4096))
    for canvas in CANVASES:
        t = np.sqrt(cfg.relatedness) * shared + np.sqrt(1 - cfg.relatedness) * rng.normal(size=(u, _DIM))
        t /= np.std(np.sum(t[pairs[0]] * w.item_vec[pairs[1]], axis=1))
        w.taste[canvas] = t.astype(np.float32)
        w.genre_cdf[canvas] = _softmax_cdf(1.5 * np.einsum("ud,gd->ug", t, centroids), uniform_mix=0.2)
    w.item_vec = w.item_vec.astype(np.float32)
    return w


def _context(w: _World, canvas: str, users: np.ndarray, rng: Rng, m: int) -> tuple[dict, np.ndarray]:
    """What the request is about, plus m context-relevant candidates for the logging policy's pool."""
    n = len(users)
    if canvas == "related":
        anchor = _draw(w.pop_cdf, rng.random(n))
        shared = rng.random((n, m)) < w.r
        by_genre = _draw_in_group(w.by_genre, np.repeat(w.item_genre[anchor][:, None], m, 1), rng)
        by_cluster = _draw_in_group(w.by_cluster, np.repeat(w.rel_cluster[anchor][:, None], m, 1), rng)
        cand = np.where(shared, by_genre, by_cluster)
        return {"anchor": anchor}, cand
    genre = _draw(w.genre_cdf[canvas][users], rng.random(n))
    cand = _draw_in_group(w.by_genre, np.repeat(genre[:, None], m, 1), rng)
    if canvas != "search":
        return {"genre": genre}, cand
    # The user has cand[:, 0] in mind: the query is its genre name and/or 1-3 words of its title.
    has_genre = rng.random(n) < 0.6
    n_title = rng.integers(1, 4, n) - has_genre
    words = w.item_words[cand[:, 0]]
    shuffled = np.take_along_axis(words, np.argsort(np.where(words >= 0, rng.random(words.shape), 2.0), 1), 1)
    qwords = np.where(np.arange(3) < n_title[:, None], shuffled[:, :3], -1)
    return {"qgenre": np.where(has_genre, genre, -1), "qwords": qwords}, cand


def _relevance(w: _World, canvas: str, users: np.ndarray, ctx: dict, pool: np.ndarray) -> np.ndarray:
    """Ground-truth relevance of each pooled item to its request's context (roughly unit scale)."""
    if canvas == "related":
        return np.einsum("nd,nmd->nm", w.rel_vec[ctx["anchor"]], w.rel_vec[pool])
    taste = np.einsum("nd,nmd->nm", w.taste[canvas][users], w.item_vec[pool])
    if canvas == "home":
        return taste
    if canvas == "genre":
        return 1.2 * w.item_gw[pool, ctx["genre"][:, None]] + 0.9 * taste
    qg, qw = ctx["qgenre"], ctx["qwords"][:, None, :, None]
    gmatch = (qg >= 0)[:, None] & (w.item_gw[pool, np.maximum(qg, 0)[:, None]] > 0)
    overlap = ((qw == w.item_words[pool][:, :, None, :]) & (qw >= 0)).any(axis=-1).sum(axis=-1)
    return 1.2 * gmatch + 1.0 * overlap + 0.7 * taste


def _simulate_batch(w: _World, cfg: SyntheticConfig, canvas: str, rng: Rng, n: int) -> dict:
    """Users, contexts, logged slates and clicks of n requests.

    The logging policy samples without replacement (Gumbel top-k) from a pool of popular items,
    context-relevant items and a random block of distinct items, so the logs are neither random nor optimal
    and every request has enough distinct candidates for its slate.
    """
    s = cfg.slate_max
    users = _draw(w.user_cdf, rng.random(n))
    ctx, relevant = _context(w, canvas, users, rng, 2 * s)
    block = (rng.integers(0, cfg.n_items, n)[:, None] + np.arange(s + 1)) % cfg.n_items
    pool = np.concatenate([_draw(w.pop_cdf, rng.random((n, s))), relevant, block], axis=1)
    rel = _relevance(w, canvas, users, ctx, pool)
    score = _LOGGING[0] * rel + _LOGGING[1] * w.logpop[pool] + rng.gumbel(size=pool.shape)
    order = np.argsort(pool, axis=1, kind="stable")
    sorted_pool = np.take_along_axis(pool, order, 1)
    dup = np.zeros(pool.shape, dtype=bool)
    np.put_along_axis(dup, order, np.pad(sorted_pool[:, 1:] == sorted_pool[:, :-1], ((0, 0), (1, 0))), 1)
    if canvas == "related":
        dup |= pool == ctx["anchor"][:, None]
    score[dup] = -np.inf
    top = np.argpartition(-score, s - 1, axis=1)[:, :s]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable"), 1)
    items, rel = np.take_along_axis(pool, top, 1), np.take_along_axis(rel, top, 1)
    a, b, c = _CLICK[canvas]
    logit = a * rel + b * w.logpop[items] - _POS_BIAS * np.log1p(np.arange(s)) + c
    prob = 1.0 / (1.0 + np.exp(-logit))
    click = rng.random(prob.shape) < prob
    size = rng.integers(cfg.slate_min, s + 1, n)
    return dict(users=users, items=items, prob=prob, click=click, shown=np.arange(s) < size[:, None], **ctx)


def _simulate_rows(w: _World, cfg: SyntheticConfig, rng: Rng, n: int) -> dict:
    """The ``rows`` canvas: which genre rows a home page shows a user, in what order, and which get a click.

    Relevance is the user's ``rows`` taste against each genre's centroid; the logging policy and the
    click model are those of the item canvases (Gumbel top-k on relevance and popularity; logistic
    clicks with a position bias), over the genres instead of an item pool.
    """
    g = len(GENRES)
    users = _draw(w.user_cdf, rng.random(n))
    rel = np.einsum("nd,gd->ng", w.taste["rows"][users], w.centroids)
    rel /= np.std(rel) or 1.0
    score = _LOGGING[0] * rel + _LOGGING[1] * w.genre_logpop + rng.gumbel(size=rel.shape)
    order = np.argsort(-score, axis=1, kind="stable")
    rows, rel = order, np.take_along_axis(rel, order, 1)
    a, b, c = _CLICK["rows"]
    logit = a * rel + b * w.genre_logpop[rows] - _POS_BIAS * np.log1p(np.arange(g)) + c
    prob = 1.0 / (1.0 + np.exp(-logit))
    click = rng.random(prob.shape) < prob
    size = rng.integers(_ROWS_SHOWN[0], _ROWS_SHOWN[1] + 1, n)
    return dict(users=users, items=rows, prob=prob, click=click, shown=np.arange(g) < size[:, None])


def _simulate(w: _World, cfg: SyntheticConfig, canvas: str, rng: Rng, n: int) -> dict:
    """_simulate_batch over fixed-size batches, so temporaries stay small whatever the chunk size."""
    one = (
        _simulate_rows
        if canvas == "rows"
        else (lambda w, cfg, rng, k: _simulate_batch(w, cfg, canvas, rng, k))
    )
    parts = [one(w, cfg, rng, min(_BATCH, n - lo)) for lo in range(0, n, _BATCH)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def _join(vocab: tuple[str, ...], ids: np.ndarray, sep: str) -> pa.Array:
    """Join the non-negative vocabulary ids of each row into one string, without a Python loop."""
    valid = ids >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32)
    flat = pa.array(vocab).take(pa.array(ids[valid]))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), flat), sep)


def _codes(vocab: tuple[str, ...], idx: np.ndarray) -> pa.Array:
    return pa.array(vocab).take(pa.array(idx))


def _request_ids(cfg: SyntheticConfig, canvas: str, lo: int, hi: int) -> np.ndarray:
    """Random-looking but unique ids: x -> (x * odd + salt) mod 2**40 is a bijection."""
    mask = np.uint64((1 << 40) - 1)
    salt = np.random.SeedSequence([cfg.seed, CANVASES.index(canvas), 2]).generate_state(1, np.uint64)[0]
    return ((np.arange(lo, hi, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + salt) & mask).astype(
        np.int64
    )


def _times_ms(cfg: SyntheticConfig, lo: int, hi: int, rng: Rng) -> np.ndarray:
    """Uniform request times; chunk i covers the i-th time slice, so part files are in time order."""
    start, span = cfg.start_time * 1000, cfg.days * 86_400_000
    t0 = start + lo * span // cfg.requests_per_task
    t1 = start + hi * span // cfg.requests_per_task
    return np.sort(rng.integers(t0, max(t1, t0 + 1), hi - lo))


def _prefixed(prefix: str, ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(ids), pa.string()), "-")


def _table(w: _World, canvas: str, sim: dict, t_ms: np.ndarray, rid: np.ndarray) -> tuple:
    """Per-canvas rows of one chunk in its own schema; also returns each row's request index."""
    r, p = np.nonzero(sim["shown"] & sim["click"] if canvas == "genre" else sim["shown"])
    users, items, click = sim["users"][r], sim["items"][r, p] + 1, sim["click"][r, p]
    if canvas == "rows":  # candidates are genres, by name
        genre, sid = _codes(GENRES, items - 1), _prefixed("p", rid).take(r)
        cols = [
            users + 1,
            genre,
            click.astype(np.int8),
            t_ms[r],
            sid,
            _codes(COUNTRIES, w.user_country[users]),
        ]
        arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in cols]
        return pa.Table.from_arrays(arrays, schema=SCHEMAS[canvas]), r
    country, lang = _codes(COUNTRIES, w.user_country[users]), _codes(LANGUAGES, w.user_lang[users])
    if canvas == "home":
        sid = _prefixed("s", rid).take(r)
        cols = [users + 1, country, lang, items, click.astype(np.int8), t_ms[r], sid, p.astype(np.int16)]
    elif canvas == "related":
        iso = np.datetime_as_string((t_ms // 1000).astype("datetime64[s]"), unit="s", timezone="UTC")
        anchor, ts, req = sim["anchor"][r] + 1, pa.array(iso).take(r), _prefixed("r", rid).take(r)
        cols = [anchor, items, click, ts, country, req]
    elif canvas == "search":
        words = np.where(sim["qwords"] >= 0, sim["qwords"] + len(GENRES), -1)
        query = _join(GENRES + WORDS, np.concatenate([sim["qgenre"][:, None], words], 1), " ").take(r)
        result = pc.cast(pa.array(items), pa.string())
        cols = [query, users + 1, result, np.where(click, "1", "0"), t_ms[r] / 1000.0, rid[r], lang]
    else:
        cols = [_codes(GENRES, sim["genre"][r]), users + 1, items, t_ms[r] // 1000, rid[r]]
    arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in cols]
    return pa.Table.from_arrays(arrays, schema=SCHEMAS[canvas]), r


def _null(col: pa.Array, rng: Rng, cfg: SyntheticConfig) -> pa.Array:
    return pa.nulls(len(col), col.type)


def _unknown(col: pa.Array, rng: Rng, cfg: SyntheticConfig) -> pa.Array:
    return pa.array(cfg.n_items + rng.integers(1, 10 * cfg.n_items + 1, len(col))).cast(col.type)


def _bad_ts(col: pa.Array, rng: Rng, cfg: SyntheticConfig) -> pa.Array:
    """Null, the epoch (0) or a negative time; text timestamps get unparseable or epoch strings instead."""
    kind = rng.integers(0, 3, len(col))
    if pa.types.is_string(col.type):
        return pa.array(np.array(["", "not-a-time", "1970-01-01T00:00:00Z"])[kind], mask=kind == 0)
    return pa.array(np.where(kind == 1, 0, -rng.integers(1, 10**9, len(col))), mask=kind == 0).cast(col.type)


def _bad_type(col: pa.Array, rng: Rng, cfg: SyntheticConfig) -> pa.Array:
    return pc.binary_join_element_wise("x", col, "z", "")


def _const(value: object) -> Callable:
    return lambda col, rng, cfg: pa.repeat(pa.scalar(value, col.type), len(col))


_CANDIDATE = {"home": "video_id", "related": "shown_video", "search": "result_id", "genre": "title"}
_CANDIDATE["rows"] = "row_genre"
_TIMESTAMP = {
    "home": "event_ts",
    "related": "ts_utc",
    "search": "timestamp_s",
    "genre": "ts",
    "rows": "ts_ms",
}
_LABEL = {"home": ("play_start", _const(7)), "related": ("click", _null), "rows": ("clicked", _const(3))}
_LABEL["search"] = ("clicked", _const("yes?"))


def _dirt_kinds(canvas: str) -> dict:
    """Dirt kind -> (column, mutation) for one canvas; `duplicate` copies a row unchanged."""
    cand = _CANDIDATE[canvas]
    kinds = {"duplicate": None, "null_candidate": (cand, _null), "unknown_candidate": (cand, _unknown)}
    kinds["bad_timestamp"] = (_TIMESTAMP[canvas], _bad_ts)
    if canvas in _LABEL:
        kinds["bad_label"] = _LABEL[canvas]
    if canvas == "search":
        kinds["bad_type"] = (cand, _bad_type)
    return kinds


def _add_dirt(table: pa.Table, req: np.ndarray, kinds: dict, cfg: SyntheticConfig, rng: Rng) -> tuple:
    """Insert ~dirt_rate x rows bad rows next to the request they copy; each has exactly one defect.

    Within one kind, dirty rows come from distinct requests, so no two dirty rows are identical by chance
    and the duplicates in a file are exactly the `duplicate` rows. Returns the table and counts per kind.
    """
    total = rng.binomial(table.num_rows, min(max(cfg.dirt_rate, 0.0), 1.0))
    per_kind = rng.multinomial(total, np.full(len(kinds), 1.0 / len(kinds)))
    live, starts, lens = np.unique(req, return_index=True, return_counts=True)
    parts, keys, counts = [table], [req], {}
    for (kind, mutation), n in zip(kinds.items(), per_kind, strict=True):
        pick = rng.choice(len(live), min(int(n), len(live)), replace=False)
        src = starts[pick] + (rng.random(len(pick)) * lens[pick]).astype(np.int64)
        bad = table.take(pa.array(src, type=pa.int64()))
        if mutation is not None:
            name, fn = mutation
            i = bad.schema.get_field_index(name)
            bad = bad.set_column(i, bad.schema.field(i), fn(bad[name].combine_chunks(), rng, cfg))
        parts.append(bad)
        keys.append(req[src])
        counts[kind] = len(pick)
    order = np.argsort(np.concatenate(keys), kind="stable")
    return pa.concat_tables(parts).take(pa.array(order)), counts


def _write_canvas(w: _World, cfg: SyntheticConfig, canvas: str, out: Path) -> dict:
    """Simulate and write one canvas chunk by chunk; only one chunk is ever in memory."""
    folder = out / canvas
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("part-*.parquet")):
        old.unlink()  # a previous, larger run must not leave stale parts behind
    kinds = _dirt_kinds(canvas)
    stats = {"rows": 0, "requests": 0, "dirt": dict.fromkeys(kinds, 0)}
    ci, step = CANVASES.index(canvas), max(cfg.chunk_requests, 1)
    for part, lo in enumerate(range(0, cfg.requests_per_task, step)):
        hi = min(lo + step, cfg.requests_per_task)
        rng = np.random.default_rng([cfg.seed, ci, part, 0])
        sim = _simulate(w, cfg, canvas, rng, hi - lo)
        t_ms, rid = _times_ms(cfg, lo, hi, rng), _request_ids(cfg, canvas, lo, hi)
        table, req = _table(w, canvas, sim, t_ms, rid)
        table, dirt = _add_dirt(table, req, kinds, cfg, np.random.default_rng([cfg.seed, ci, part, 1]))
        stats["requests"] += len(np.unique(req))
        stats["rows"] += table.num_rows
        stats["dirt"] = {k: v + dirt[k] for k, v in stats["dirt"].items()}
        _write(table, folder / f"part-{part:05d}.parquet")
    return stats


def _write(table: pa.Table, path: Path) -> None:
    """One fixed writer configuration: same table, same bytes."""
    pq.write_table(table, path, row_group_size=_ROW_GROUP, compression="zstd", compression_level=3)


def generate(cfg: SyntheticConfig, out_dir: str | Path) -> dict:
    """Write the catalogues (items, genres) and the five canvas logs under out_dir; return a summary dict
    {"items": n, "users": n, "canvases": {canvas: {"rows": n, "requests": n, "dirt": {kind: n}}}}.

    `rows` counts every row written (dirty rows included); `requests` counts logged requests (for the
    positives-only genre canvas, the requests with at least one engaged row).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    w = _build_world(cfg)
    titles, genres = _join(WORDS, w.item_words, " "), _join(GENRES, w.item_genres, "|")
    items = [pa.array(np.arange(1, cfg.n_items + 1)), titles, genres, pa.array(w.item_year, pa.int32())]
    _write(pa.Table.from_arrays(items, ["item_id", "title", "genres", "year"]), out / "items.parquet")
    genres = [pa.array(GENRES), pa.array(w.genre_titles), pa.array(w.genre_logpop)]
    _write(pa.Table.from_arrays(genres, ["genre", "titles", "popularity"]), out / "genres.parquet")
    country, lang = _codes(COUNTRIES, w.user_country), _codes(LANGUAGES, w.user_lang)
    users = [pa.array(np.arange(1, cfg.n_users + 1)), country, lang]
    _write(pa.Table.from_arrays(users, ["user_id", "country", "language"]), out / "users.parquet")
    canvases = {canvas: _write_canvas(w, cfg, canvas, out) for canvas in CANVASES}
    return {"items": cfg.n_items, "users": cfg.n_users, "canvases": canvases}


def main(argv=None) -> None:
    """``python -m unirec.data.synthetic OUT [overrides]``: generate the synthetic canvases of a training
    config (the same Hydra overrides as ``unirec.train``, e.g. ``experiment=synthetic_100m``) into OUT once,
    to prepare them as ``data.name=raw data.raw_dir=OUT``; prints the summary. Generation is chunked
    (``data.synthetic.chunk_requests`` requests at a time), so its memory does not grow with the size."""
    import json
    import sys

    from unirec.config import compose

    argv = sys.argv[1:] if argv is None else argv
    if not argv or "=" in argv[0]:
        raise SystemExit("usage: python -m unirec.data.synthetic OUT [overrides]")
    cfg = compose(argv[1:])
    print(json.dumps(generate(cfg.data.synthetic, argv[0]), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
