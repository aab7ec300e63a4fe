"""Label preparation: per-canvas raw logs -> cleaned examples in the unified schema.

Each canvas keeps its own raw column names; its adapter (``task.<name>.adapter`` in config) maps them.
The row-wise steps (:func:`clean_batch`, :func:`to_examples`, :func:`split_batch`) are pure functions of
one Arrow table, so both preparation engines (:mod:`unirec.data.engine_local`, and Spark ``mapInArrow`` in
:mod:`unirec.data.engine_spark`) run them unchanged. :func:`drop_duplicates`, :func:`sample_negatives` and
:func:`with_first_time` need every row of a request (an engine groups rows by request first); the time
cut-offs and the down-sampling threshold need every request (:func:`cutoffs_from_counts`,
:func:`keep_threshold` take what an engine aggregated). Every choice that looks random (a request's id, a
sampled negative, a kept request) is a hash of the row's content, so it does not depend on the row's
position or partition.

Every rejected row keeps its raw values (as text) and gets a ``reason``; nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unirec.config import FieldConfig, LabelSource, SplitConfig, TaskConfig
from unirec.data.ids import content_hash, mix, normalise_ids, uniform
from unirec.kinds import kind_of

# The unified labeled columns (context fields follow, one per unified context field).
REQUEST, TIMESTAMP, CANDIDATE, LABEL, WEIGHT, TASK_TYPE = (
    "request_id",
    "timestamp",
    "candidate",
    "label",
    "weight",
    "task_type",
)
SPLITS = ("train", "valid", "test")
# Optional unified column: the event's order within one second (adapter.order), the history join's tie-break.
ORDER = "event_order"
# Optional raw column with a precomputed split (train/valid/test) for every row, e.g. a leave-last-out
# split made by the data set's derivation; where a canvas log has it, it replaces the time cut-offs.
SPLIT = "split"
# Request ids are unique across tasks: the task id sits above a 56-bit hash of the request's text.
_TASK_SHIFT = 56
MAX_TASK_ID = 127
FIRST_TIME = "__first_ts"
"""Auxiliary column an engine adds before the split: the time of the row's request's first event."""
# Earliest plausible event time (1990-01-01); earlier values are clock or parsing errors.
MIN_TIMESTAMP = 631_152_000
_TRUE = ("1", "true", "t", "yes", "y")
_FALSE = ("0", "false", "f", "no", "n")


@dataclass
class Cleaned:
    """A canvas table split into good rows (raw columns, typed) and rejects (raw text + reason)."""

    good: pa.Table
    rejects: pa.Table


def clean_batch(
    raw: pa.Table, task: TaskConfig, catalogue_ids: pa.Array, latest: Optional[int] = None
) -> Cleaned:
    """Check every row of one raw batch; the first failing rule names its reject reason.

    Adds typed columns ``__request``, ``__candidate`` (id as text), ``__label`` and ``__ts`` (epoch s).
    ``catalogue_ids`` holds the known candidate ids as text. A timestamp before MIN_TIMESTAMP or after
    ``latest`` (epoch s; None: no upper bound) is a ``bad_timestamp``.
    """
    a = task.adapter
    _require_columns(raw, task)
    _require_types(raw, task)
    n = raw.num_rows
    reason = np.full(n, None, dtype=object)

    def flag(mask, why: str) -> None:
        mask = np.asarray(pc.fill_null(mask, True), dtype=bool) & (reason == None)  # noqa: E711
        reason[mask] = why

    flag(pc.is_null(raw[a.request]), f"missing:{a.request}")
    cand_raw = raw[a.candidate]
    flag(pc.is_null(cand_raw), f"missing:{a.candidate}")
    cand_txt = pc.cast(cand_raw, pa.string())
    if pa.types.is_string(cand_raw.type) and pa.types.is_integer(catalogue_ids.type):
        flag(pc.invert(pc.match_substring_regex(cand_raw, r"^\s*-?\d+\s*$")), f"bad_type:{a.candidate}")
    for fname, column in a.context.items():
        bad = kind_of(task.context[fname]).bad_values(raw[column])
        if bad is not None:
            flag(bad, f"bad_type:{column}")
    label = _parse_label(raw[a.label]) if a.label else pa.array(np.ones(n, dtype=np.float32))
    flag(pc.is_null(label), "bad_label")
    ts = _parse_timestamp(raw[a.timestamp], a.timestamp_unit, f"{a.source}.{a.timestamp}")
    flag(pc.or_(pc.is_null(ts), pc.less(ts, MIN_TIMESTAMP)), "bad_timestamp")
    if latest is not None:
        flag(pc.greater(ts, latest), "bad_timestamp")
    known = pc.is_in(normalise_ids(cand_txt), value_set=normalise_ids(catalogue_ids))
    flag(pc.invert(known), "unknown_candidate")
    if SPLIT in raw.column_names:
        flag(pc.invert(pc.is_in(pc.cast(raw[SPLIT], pa.string()), value_set=pa.array(SPLITS))), "bad_split")

    ok = reason == None  # noqa: E711
    good = raw.filter(pa.array(ok))
    good = good.append_column("__request", pc.cast(raw[a.request], pa.string()).filter(pa.array(ok)))
    good = good.append_column("__candidate", normalise_ids(cand_txt).filter(pa.array(ok)))
    good = good.append_column("__label", pc.cast(label, pa.float32()).filter(pa.array(ok)))
    good = good.append_column("__ts", ts.filter(pa.array(ok)))
    return Cleaned(good, _rejects(raw, ~ok, reason))


def drop_duplicates(cleaned: Cleaned, raw_columns: list) -> Cleaned:
    """Reject exact repeats of a raw row (keeping the first); needs the whole canvas, like Spark's dropDuplicates."""
    good = cleaned.good
    if good.num_rows == 0:
        return cleaned
    idx = good.append_column("__row", pa.array(np.arange(good.num_rows)))
    first = idx.group_by(raw_columns, use_threads=False).aggregate([("__row", "min")])["__row_min"]
    keep = np.zeros(good.num_rows, dtype=bool)
    keep[first.to_numpy()] = True
    reason = np.where(keep, None, "duplicate").astype(object)
    dups = _rejects(good.select(raw_columns), ~keep, reason)
    rejects = pa.concat_tables([cleaned.rejects, dups.cast(cleaned.rejects.schema)])
    return Cleaned(good.filter(pa.array(keep)), rejects)


def duplicate_rejects(raw: pa.Table) -> pa.Table:
    """The rejects of rows known to repeat a kept row (an engine's duplicate removal found them)."""
    n = raw.num_rows
    return _rejects(raw, np.ones(n, dtype=bool), np.full(n, "duplicate", dtype=object))


def to_examples(good: pa.Table, task: TaskConfig, ctx_fields: Mapping[str, FieldConfig]) -> pa.Table:
    """Map cleaned rows to unified columns; fields this task lacks stay null (their sentinel comes later)."""
    a = task.adapter
    if not 0 <= task.id <= MAX_TASK_ID:
        raise ValueError(
            f"task id {task.id} (log {a.source!r}) must lie in 0..{MAX_TASK_ID}: it tops request ids"
        )
    return _examples(good, task, ctx_fields)


def _examples(good: pa.Table, task: TaskConfig, ctx_fields: Mapping[str, FieldConfig]) -> pa.Table:
    a = task.adapter
    request = content_hash(good["__request"]) >> np.uint64(64 - _TASK_SHIFT)
    cols = {
        REQUEST: pa.array(request.astype(np.int64) | (task.id << _TASK_SHIFT)),
        TIMESTAMP: good["__ts"],
        TASK_TYPE: pa.array(np.full(good.num_rows, task.id, dtype=np.int32)),
        CANDIDATE: good["__candidate"],
        LABEL: good["__label"],
        WEIGHT: pa.array(np.ones(good.num_rows, dtype=np.float32)),
    }
    for fname, fcfg in ctx_fields.items():
        kind = kind_of(fcfg)
        if fname in a.context:
            cols[fname] = kind.to_raw(good[a.context[fname]])
        else:
            cols[fname] = pa.nulls(good.num_rows, kind.raw_type)
    if a.order:
        cols[ORDER] = pc.cast(good[a.order], pa.int64())
    if SPLIT in good.column_names:
        cols[SPLIT] = pc.cast(good[SPLIT], pa.string())
    return pa.table(cols)


def sample_negatives(examples: pa.Table, task: TaskConfig, catalogue_ids: pa.Array, seed: int) -> pa.Table:
    """For positives-only logs: add ``labels.negatives`` uniformly sampled items per positive, same request.

    A negative is never one of its request's positives (collisions are redrawn), so ``examples`` must hold
    every row of its requests. Draw j of a positive is a hash of (seed, task, request, candidate, j, try):
    the same rows get the same negatives in any order and partitioning.
    """
    if task.labels.source != LabelSource.positives or task.labels.negatives <= 0 or examples.num_rows == 0:
        return examples
    k = task.labels.negatives
    ids = normalise_ids(catalogue_ids)
    n_ids = len(ids)
    req = examples[REQUEST].to_numpy()
    pos_idx = pc.index_in(examples[CANDIDATE], value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    # Dense request codes of this table: exact clash tests without overflowing request id x catalogue size.
    _, code = np.unique(req, return_inverse=True)
    positives = np.unique(code * n_ids + pos_idx)
    rows, j = np.repeat(np.arange(examples.num_rows), k), np.tile(np.arange(k), examples.num_rows)

    def draw_at(attempt, rows, j):
        h = mix(seed, task.id, 17, req[rows], pos_idx[rows], j, attempt)
        return (h % np.uint64(n_ids)).astype(np.int64)

    draw = draw_at(0, rows, j)
    for attempt in range(1, 17):
        clash = np.isin(code[rows] * n_ids + draw, positives)
        if not clash.any():
            break
        draw[clash] = draw_at(attempt, rows[clash], j[clash])
    else:
        # A request that engaged with nearly the whole catalogue: drop the draws that still clash.
        keep = ~np.isin(code[rows] * n_ids + draw, positives)
        rows, draw = rows[keep], draw[keep]
    neg = examples.take(pa.array(rows))
    neg = neg.set_column(neg.schema.get_field_index(CANDIDATE), CANDIDATE, ids.take(pa.array(draw)))
    neg = neg.set_column(neg.schema.get_field_index(LABEL), LABEL, pa.array(np.zeros(len(rows), np.float32)))
    return pa.concat_tables([examples, neg]).sort_by([(REQUEST, "ascending")])


def rows_per_logged_row(task: TaskConfig) -> int:
    """Examples per cleaned log row: 1, or 1 + ``labels.negatives`` where negatives are sampled."""
    sampled = task.labels.source == LabelSource.positives and task.labels.negatives > 0
    return 1 + task.labels.negatives if sampled else 1


def time_cutoffs(examples: Sequence[pa.Table], split: SplitConfig) -> Tuple[int, int]:
    """Valid and test start times: quantiles of every task's request times together (whole tables).

    One pair of cut-offs for all tasks, not one per task: with a shared trunk, one task's training rows
    must not come from another task's validation period.
    """
    times = [_request_times(t)[1] for t in examples if t.num_rows]
    values, counts = np.unique(np.concatenate(times) if times else np.zeros(0, np.int64), return_counts=True)
    return cutoffs_from_counts(values, counts, split)


def cutoffs_from_counts(values: np.ndarray, counts: np.ndarray, split: SplitConfig) -> Tuple[int, int]:
    """:func:`time_cutoffs` from a histogram of request first times (distinct ``values``, their ``counts``):
    the lower quantiles at ``1 - valid - test`` and ``1 - test``, exact, whatever engine counted them.

    >>> cutoffs_from_counts(np.array([10, 20, 30]), np.array([8, 1, 1]), SplitConfig(valid=0.1, test=0.1))
    (10, 20)
    """
    n = int(np.sum(counts))
    if n == 0:
        raise ValueError("no labeled examples in any task: check the adapters and the raw logs")
    order = np.argsort(values, kind="stable")
    values, ends = np.asarray(values)[order], np.cumsum(np.asarray(counts)[order])

    def lower(q: float) -> int:
        k = int(np.floor(q * (n - 1)))  # the 0-based rank of the lower quantile
        return int(values[np.searchsorted(ends, k, side="right")])

    return lower(1.0 - split.valid - split.test), lower(1.0 - split.test)


def with_first_time(examples: pa.Table) -> pa.Table:
    """``examples`` plus :data:`FIRST_TIME`, its request's first event time (every row of a request here)."""
    req_ids, req_ts = _request_times(examples)
    row_ts = req_ts[pc.index_in(examples[REQUEST], value_set=req_ids).to_numpy()] if examples.num_rows else []
    return examples.append_column(FIRST_TIME, pa.array(np.asarray(row_ts, np.int64), pa.int64()))


def split_batch(examples: pa.Table, cutoffs: Tuple[int, int]) -> Dict[str, pa.Table]:
    """Rows of any batch by split: train before ``cutoffs[0]``, valid until ``cutoffs[1]``, test after, by
    the :data:`FIRST_TIME` of each row's request (so no request straddles two splits); rows with a
    precomputed ``split`` column follow it instead. The auxiliary columns are dropped."""
    rest = examples.drop_columns([c for c in (SPLIT, FIRST_TIME) if c in examples.column_names])
    if SPLIT in examples.column_names:
        return {s: rest.filter(pc.equal(examples[SPLIT], s)) for s in SPLITS}
    row_ts = examples[FIRST_TIME].to_numpy()
    t_valid, t_test = cutoffs
    masks = {
        "train": row_ts < t_valid,
        "valid": (row_ts >= t_valid) & (row_ts < t_test),
        "test": row_ts >= t_test,
    }
    return {s: rest.filter(pa.array(m)) for s, m in masks.items()}


def split_by_time(examples: pa.Table, cutoffs: Tuple[int, int]) -> Dict[str, pa.Table]:
    """:func:`split_batch` of a whole table (every row of its requests)."""
    if SPLIT in examples.column_names or examples.num_rows == 0:
        return split_batch(examples, cutoffs)
    return split_batch(with_first_time(examples), cutoffs)


def keep_count(n_requests: int, task: TaskConfig) -> Optional[int]:
    """Train requests a task keeps after ``train_rate`` and ``max_train_requests``; None: all of them."""
    if task.train_rate >= 1.0 and task.max_train_requests is None:
        return None
    keep_n = int(round(n_requests * task.train_rate))
    return keep_n if task.max_train_requests is None else min(keep_n, task.max_train_requests)


def request_draw(request_ids, task: TaskConfig, seed: int) -> np.ndarray:
    """Each request's draw in [0, 1): down-sampling keeps the requests with the smallest draws."""
    return uniform(seed, task.id, 29, np.asarray(request_ids, np.int64))


def keep_threshold(draws: np.ndarray, keep_n: int) -> float:
    """The largest draw kept when ``keep_n`` of the requests with these (distinct) draws are kept."""
    if keep_n <= 0 or len(draws) == 0:
        return -1.0
    return float(np.partition(draws, min(keep_n, len(draws)) - 1)[min(keep_n, len(draws)) - 1])


def downsample(
    examples: pa.Table, task: TaskConfig, seed: int, threshold: Optional[float] = None
) -> pa.Table:
    """Stratified merge: keep ``train_rate`` of a task's requests, then at most ``max_train_requests``: the
    requests whose :func:`request_draw` is at most ``threshold`` (default: computed from ``examples``, a
    whole train split; an engine passes the one it computed over every train request)."""
    if threshold is None:
        req = np.unique(examples[REQUEST].to_numpy())
        keep_n = keep_count(len(req), task)
        if keep_n is None:
            return examples
        threshold = keep_threshold(request_draw(req, task, seed), keep_n)
    keep = request_draw(examples[REQUEST].to_numpy(), task, seed) <= threshold
    return examples.filter(pa.array(keep))


def count_reasons(rejects: pa.Table) -> Dict[str, int]:
    """Reject counts per reason, sorted by reason."""
    if rejects.num_rows == 0:
        return {}
    counts = rejects.group_by("reason", use_threads=False).aggregate([("reason", "count")])
    return dict(sorted(zip(counts["reason"].to_pylist(), counts["reason_count"].to_pylist())))


def _request_times(examples: pa.Table) -> Tuple[pa.Array, np.ndarray]:
    """Each request id and the time of its first event."""
    req = examples.group_by(REQUEST, use_threads=False).aggregate([(TIMESTAMP, "min")])
    return req[REQUEST], req[f"{TIMESTAMP}_min"].to_numpy()


def _require_columns(raw: pa.Table, task: TaskConfig) -> None:
    a = task.adapter
    needed = [a.request, a.candidate, a.timestamp, *a.context.values()]
    needed += [c for c in (a.label, a.order) if c]
    missing = [c for c in needed if c not in raw.column_names]
    if missing:
        raise KeyError(
            f"raw log {a.source!r} lacks column(s) {missing} named in the adapter; it has {raw.column_names}"
        )


def _require_types(raw: pa.Table, task: TaskConfig) -> None:
    """Every adapter column converts to its unified type (tried on no rows): a list or struct column where a
    scalar is wanted would otherwise fail deep in Arrow, naming neither the log nor the column."""
    a = task.adapter
    checks = [
        ("adapter.request", a.request, lambda c: pc.cast(c, pa.string())),
        ("adapter.candidate", a.candidate, lambda c: pc.cast(c, pa.string())),
        (
            "adapter.timestamp",
            a.timestamp,
            lambda c: _parse_timestamp(c, a.timestamp_unit, f"{a.source}.{a.timestamp}"),
        ),
    ]
    if a.label:
        checks.append(("adapter.label", a.label, _parse_label))
    checks += [(f"adapter.context.{f}", c, kind_of(task.context[f]).to_raw) for f, c in a.context.items()]
    for key, column, convert in checks:
        try:
            convert(raw[column].slice(0, 0))
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise TypeError(
                f"raw log {a.source!r}: column {column!r} ({key}) holds {raw.schema.field(column).type}, "
                f"which cannot be read as that field ({e}); fix the log or the adapter"
            ) from e


def _as_text(col) -> pa.Array:
    """Raw values as text: scalars cast, nested values (lists, structs, maps) as JSON."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_nested(col.type):
        return pa.array(
            [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string()
        )
    return pc.cast(col, pa.string())


def _parse_label(col: pa.ChunkedArray) -> pa.Array:
    """0/1 from bool, number or text; anything else is null (bad_label)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_boolean(col.type):
        return pc.cast(col, pa.float32())
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        ok = pc.is_in(col, value_set=pa.array([0, 1], col.type))
        return pc.if_else(ok, pc.cast(col, pa.float32()), pa.scalar(None, pa.float32()))
    txt = pc.utf8_lower(pc.utf8_trim_whitespace(pc.cast(col, pa.string())))
    return pc.if_else(
        pc.is_in(txt, value_set=pa.array(_TRUE)),
        pa.scalar(1.0, pa.float32()),
        pc.if_else(
            pc.is_in(txt, value_set=pa.array(_FALSE)),
            pa.scalar(0.0, pa.float32()),
            pa.scalar(None, pa.float32()),
        ),
    )


def _parse_timestamp(col: pa.ChunkedArray, unit: str, where: str) -> pa.Array:
    """Epoch seconds (int64) from seconds, milliseconds or ISO-8601 text; unparseable is null."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if unit == "iso":
        txt = pc.cast(col, pa.string())
        parsed = pc.strptime(txt, format="%Y-%m-%dT%H:%M:%SZ", unit="s", error_is_null=True)
        return pc.cast(parsed, pa.int64())
    if unit not in ("s", "ms"):
        raise ValueError(f"adapter.timestamp_unit of {where} must be s, ms or iso, got {unit!r}")
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise TypeError(
            f"raw column {where} holds {col.type}, but adapter.timestamp_unit={unit!r} needs numbers; "
            "use timestamp_unit=iso for ISO-8601 text"
        )
    # Unsafe: an int64 beyond 2**53 loses precision as a float, and such a value is out of range anyway.
    secs = pc.cast(col, pa.float64(), safe=False)
    if unit == "ms":
        secs = pc.divide(secs, 1000.0)
    finite = pc.and_(pc.is_finite(secs), pc.less(pc.abs(secs), 1e11))
    secs = pc.if_else(finite, secs, pa.scalar(None, pa.float64()))
    return pc.cast(pc.floor(secs), pa.int64())


def _rejects(raw: pa.Table, bad: np.ndarray, reason: np.ndarray) -> pa.Table:
    """The rejected rows with the reason; raw values are packed as text in one map column per row so
    that every canvas's rejects share one schema whatever its raw columns."""
    mask = pa.array(bad)
    names = raw.column_names
    n = int(bad.sum())
    values = np.empty((n, len(names)), dtype=object)
    for j, c in enumerate(names):
        values[:, j] = _as_text(raw[c].filter(mask)).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.arange(0, n * len(names) + 1, len(names), dtype=np.int32))
    keys = pa.array(np.tile(np.array(names, dtype=object), n), pa.string())
    row = pa.MapArray.from_arrays(offsets, keys, pa.array(values.ravel(), pa.string()))
    return pa.table({"reason": pa.array(reason[bad], pa.string()), "row": row})


def labeled_examples(
    raw: pa.Table,
    task: TaskConfig,
    catalogue_ids: pa.Array,
    ctx_fields: Mapping[str, FieldConfig],
    seed: int,
    latest: Optional[int] = None,
) -> Tuple[pa.Table, pa.Table]:
    """A canvas's label preparation up to the split, on a whole table: clean, dedupe, map, sample negatives
    -> (examples, rejects). The engines run the same steps batch by batch and request group by group.

    ``latest``: the last accepted timestamp (epoch s), see :func:`clean_batch`."""
    cleaned = clean_batch(raw, task, catalogue_ids, latest)
    if task.adapter.drop_duplicates:
        cleaned = drop_duplicates(cleaned, list(raw.column_names))
    return sample_negatives(
        to_examples(cleaned.good, task, ctx_fields), task, catalogue_ids, seed
    ), cleaned.rejects
