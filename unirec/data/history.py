"""Point-in-time user history: for each request, the user's engagements before it, oldest first.

The rule. An event *precedes* a request when ``(timestamp, event_order)`` of the event is
lexicographically smaller than the request's: ``ts_e < ts_r``, or ``ts_e == ts_r`` and both rows have a
non-null :data:`ORDER` and ``order_e < order_r``. Where either side lacks the order, equal timestamps do
not precede (strictly earlier only), so an engagement logged at its own request's second never leaks
into that request's features; an order only ever *adds* same-second events it can prove came first. A
history lists the preceding events oldest first, by (timestamp, event_order with nulls last, item id
text), and keeps the most recent ``max_len``: ties are broken by content, never by row order, so an engine
that sees the events in another order or partitioning builds the same histories. A null user gets a null history; a user with
no earlier event an empty one. Users and items are compared by their canonical text
(:func:`unirec.data.ids.normalise_ids`), so ``42`` in one table matches ``"042"`` in the other; events
with a null user or item are ignored.

Why partitioned. The join sorts requests and events together, so its memory is a few arrays of the
rows it sorts. :func:`point_in_time_history` therefore splits users by a content hash of their text into
buckets of about :data:`EVENTS_PER_PARTITION` events and joins one bucket at a time: memory grows with a
bucket, not the data. The per-bucket work is one pure function, :func:`history_for_partition`, so that a
distributed engine (Spark, after repartitioning both tables by user) runs the same code per partition;
the result does not depend on how users are bucketed, which the tests check.

>>> req = pa.table({"user": [1, 1, None], "timestamp": [20, 30, 30]})
>>> ev = pa.table({"user": ["1", "1", "1"], "item": [7, 8, 9], "timestamp": [10, 20, 25]})
>>> point_in_time_history(req, ev, key="user", item="item", max_len=5).to_pylist()
[['7'], ['7', '8', '9'], None]
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unirec.data.ids import content_hash, normalise_ids

HISTORY = "history"
"""The column the join adds: ``list<string>`` of item ids, oldest first."""
ORDER = "event_order"
"""Optional int64 tie-break within a second, on events and requests alike (may be null)."""
TIMESTAMP = "timestamp"
"""Event and request time, int64 epoch seconds, on both tables."""
EVENTS_PER_PARTITION = 2_000_000
"""Default bucket size of :func:`point_in_time_history`, in events."""

SNAPSHOT = "history.parquet"
"""Features-directory (and artifact) file: every user's latest history (``user``, ``history``), for serving."""
LIST_TYPE = pa.list_(pa.string())


def point_in_time_history(
    requests: pa.Table,
    events: pa.Table,
    *,
    key: str,
    item: str,
    max_len: int,
    request_key: Optional[str] = None,
    partitions: Optional[int] = None,
) -> pa.Array:
    """Each request's user history (see the module docstring for the rule), one bucket of users at a time.

    Args:
        requests: ``request_key`` (the user, any type, may be null), ``timestamp``, optionally
            ``event_order``.
        events: ``key`` (the user), ``item`` (the engaged item), ``timestamp``, optionally ``event_order``.
        key: the events' user column (and the requests' one unless ``request_key`` is given).
        item: the events' item column.
        max_len: the most recent events kept per history (>= 0).
        request_key: the requests' user column, when it is named differently.
        partitions: user buckets; default enough for about :data:`EVENTS_PER_PARTITION` events each.

    Returns:
        ``list<string>`` aligned with ``requests`` rows.
    """
    request_key = request_key or key
    requests = _narrow(requests, "requests", [request_key, TIMESTAMP])
    events = _narrow(events, "events", [key, item, TIMESTAMP])
    _check_max_len(max_len)
    if partitions is None:
        partitions = max(1, math.ceil(events.num_rows / EVENTS_PER_PARTITION))
    if not isinstance(partitions, (int, np.integer)) or partitions < 1:
        raise ValueError(
            f"partitions must be a positive integer (or None for the default), got {partitions!r}"
        )
    r_rows = _rows_by_bucket(_buckets(_user_text(requests[request_key]), partitions), partitions)
    e_rows = _rows_by_bucket(_buckets(_user_text(events[key]), partitions), partitions)
    parts, order = [], []
    for r, e in zip(r_rows, e_rows):  # one bucket in memory at a time
        if len(r):
            parts.append(
                history_for_partition(
                    requests.take(r),
                    events.take(e),
                    key=key,
                    item=item,
                    max_len=max_len,
                    request_key=request_key,
                )
            )
            order.append(r)
    if not parts:
        return pa.array([], LIST_TYPE)
    back = np.empty(requests.num_rows, np.int64)
    back[np.concatenate(order)] = np.arange(requests.num_rows)
    return pa.concat_arrays(parts).take(pa.array(back))  # back to the requests' row order


def history_for_partition(
    requests: pa.Table,
    events: pa.Table,
    *,
    key: str,
    item: str,
    max_len: int,
    request_key: Optional[str] = None,
) -> pa.Array:
    """The join on one partition (all of a user's requests and events in the same one); pure.

    Requests and events are sorted together by (user, timestamp, order class, order, kind, item text),
    where a request without an order sorts before every event of its second, an event without one after
    every ordered row, and at equal orders the request comes first: the events before a request in that
    sort are exactly those that precede it, so a running count of events gives each history's end.

    Arguments and result as :func:`point_in_time_history`.
    """
    request_key = request_key or key
    _check_columns(requests, "requests", [request_key, TIMESTAMP])
    _check_columns(events, "events", [key, item, TIMESTAMP])
    _check_max_len(max_len)
    ev_user, ev_item, ev_ts, ev_ord, ev_has = _usable_events(events, key, item)
    rq_user = _user_text(requests[request_key])
    rq_ts, (rq_ord, rq_has) = _ints(requests, TIMESTAMP, "requests"), _order(requests)

    # One code per user text over both tables; null request users get -1 (and a null history).
    codes = pc.dictionary_encode(pa.concat_arrays([ev_user, rq_user]))
    n_users = len(codes.dictionary)
    codes = pc.fill_null(codes.indices, -1).to_numpy().astype(np.int64)
    n_ev = len(ev_ts)
    ev_code, rq_code = codes[:n_ev], codes[n_ev:]
    valid = rq_code >= 0

    is_event = np.r_[np.ones(n_ev, np.int8), np.zeros(int(valid.sum()), np.int8)]
    perm = np.lexsort(
        (
            np.r_[_text_rank(ev_item), np.zeros(int(valid.sum()), np.int64)],
            is_event,
            np.r_[ev_ord, rq_ord[valid]],
            np.r_[np.where(ev_has, 1, 2), np.where(rq_has[valid], 1, 0)],
            np.r_[ev_ts, rq_ts[valid]],
            np.r_[ev_code, rq_code[valid]],
        )
    )
    events_before = np.cumsum(is_event[perm])  # a request adds 0, so this counts the events before it
    rank = np.empty(len(perm), np.int64)
    rank[perm] = np.arange(len(perm))
    end = events_before[rank[n_ev:]]
    counts = np.bincount(ev_code, minlength=n_users)
    user_start = (np.cumsum(counts) - counts)[rq_code[valid]]
    start = np.maximum(user_start, end - max_len)
    lo, hi = np.zeros(len(rq_code), np.int64), np.zeros(len(rq_code), np.int64)
    lo[valid], hi[valid] = start, end
    sorted_items = ev_item.take(pa.array(perm[is_event[perm] == 1]))
    return _list_of_ranges(sorted_items, lo, hi, null=~valid)


def history_snapshot(events: pa.Table, *, key: str, item: str, max_len: int) -> pa.Table:
    """Every user's last ``max_len`` events as of the end of ``events``, oldest first, sorted by user text.

    The same order as :func:`point_in_time_history`: what a request after every event would get.

    Returns:
        ``user`` (string) and ``history`` (``list<string>``), one row per user with a non-null id.
    """
    events = _narrow(events, "events", [key, item, TIMESTAMP])
    _check_max_len(max_len)
    user, ev_item, ts, order, has = _usable_events(events, key, item)
    users = pc.unique(user)
    users = users.take(pc.sort_indices(users))
    code = pc.index_in(user, value_set=users).to_numpy().astype(np.int64)
    perm = np.lexsort((_text_rank(ev_item), order, np.where(has, 1, 2), ts, code))
    counts = np.bincount(code, minlength=len(users))
    end = np.cumsum(counts)
    start = np.maximum(end - counts, end - max_len)
    history = _list_of_ranges(ev_item.take(pa.array(perm)), start, end, null=np.zeros(len(users), bool))
    return pa.table({"user": users, HISTORY: history})


# ------------------------------------------------------------------------------------------------ helpers


def _check_columns(table: pa.Table, name: str, needed: List[str]) -> None:
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise KeyError(
            f"{name} table lacks column(s) {missing} needed by the history join; it has {table.column_names} "
            f"(pass key=/item=/request_key= naming its columns, or add {TIMESTAMP!r} as int64 epoch seconds)"
        )


def _narrow(table: pa.Table, name: str, needed: List[str]) -> pa.Table:
    """Only the columns the join reads (and the optional order), so buckets copy nothing else."""
    _check_columns(table, name, needed)
    return table.select(list(dict.fromkeys(needed + ([ORDER] if ORDER in table.column_names else []))))


def _check_max_len(max_len: int) -> None:
    if not isinstance(max_len, (int, np.integer)) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative integer (events kept per history), got {max_len!r}")


def _usable_events(events: pa.Table, key: str, item: str):
    """(user text, item text, timestamp, order, order set) of the events with a user and an item; the
    others cannot be matched to a request or shown in a history."""
    user, item_text = _user_text(events[key]), normalise_ids(events[item])
    keep = np.asarray(pc.and_(pc.is_valid(user), pc.is_valid(item_text)), dtype=bool)
    ts, (order, has) = _ints(events, TIMESTAMP, "events"), _order(events)
    mask = pa.array(keep)
    return user.filter(mask), item_text.filter(mask), ts[keep], order[keep], has[keep]


def _user_text(col) -> pa.Array:
    """The canonical text of user ids, the form both tables are matched in."""
    return normalise_ids(pc.cast(col, pa.string()))


def _ints(table: pa.Table, column: str, name: str) -> np.ndarray:
    """A non-null integer column as int64 numpy."""
    try:
        col = pc.cast(table[column], pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise TypeError(
            f"{name} column {column!r} must be int64 epoch seconds, got {table[column].type}"
        ) from e
    if col.null_count:
        raise ValueError(
            f"{name} column {column!r} has {col.null_count} null(s): every row needs a time, drop or fill them"
        )
    return col.to_numpy().astype(np.int64)


def _order(table: pa.Table) -> Tuple[np.ndarray, np.ndarray]:
    """(:data:`ORDER` as int64 with nulls as 0, whether it is set); all unset when the column is absent."""
    if ORDER not in table.column_names:
        return np.zeros(table.num_rows, np.int64), np.zeros(table.num_rows, bool)
    try:
        col = pc.cast(table[ORDER], pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise TypeError(f"column {ORDER!r} must be int64, got {table[ORDER].type}") from e
    has = np.asarray(pc.is_valid(col), dtype=bool)
    return pc.fill_null(col, 0).to_numpy().astype(np.int64), has


def _list_of_ranges(values: pa.Array, lo: np.ndarray, hi: np.ndarray, null: np.ndarray) -> pa.Array:
    """``list<string>`` whose row i is ``values[lo[i]:hi[i]]`` (null where ``null``), without a row loop."""
    length = np.where(null, 0, hi - lo)
    offsets = np.r_[0, np.cumsum(length)]
    idx = np.repeat(lo - offsets[:-1], length) + np.arange(offsets[-1])
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)),
        values.take(pa.array(idx, pa.int64())),
        LIST_TYPE,
        mask=pa.array(null),
    )


def _buckets(users: pa.Array, partitions: int) -> np.ndarray:
    """Bucket of each user text: a content hash mod ``partitions`` (nulls in bucket 0)."""
    if partitions == 1:
        return np.zeros(len(users), np.int64)
    return (content_hash(users) % np.uint64(partitions)).astype(np.int64)


def user_buckets(col, partitions: int) -> np.ndarray:
    """The bucket of each user id (any type) out of ``partitions``: the one that :func:`point_in_time_history`
    uses, for an engine that partitions requests and events by user before :func:`history_for_partition`."""
    return _buckets(_user_text(col), partitions)


def _text_rank(text: pa.Array) -> np.ndarray:
    """Rank of each string in byte order (equal strings share a rank): the content tie-break."""
    return pc.rank(text, sort_keys="ascending", tiebreaker="dense").to_numpy().astype(np.int64)


def _rows_by_bucket(bucket: np.ndarray, partitions: int) -> List[np.ndarray]:
    """Row numbers of each bucket, in the table's row order."""
    order = np.argsort(bucket, kind="stable")
    bounds = np.searchsorted(bucket[order], np.arange(partitions + 1))
    return [order[bounds[b] : bounds[b + 1]] for b in range(partitions)]
