"""The local preparation engine: one process, pyarrow only, memory bounded by a partition, not the data.

The whole-data steps run out of core by hash-partitioned spill to parquet, in three passes:

1. **labels**: each canvas log is streamed batch by batch through :meth:`Plan.clean`; rejects go straight
   to their file, good rows to one of P spill files by a hash of their request.
2. **requests**: each spill file holds every row of its requests (and so every copy of a duplicate row):
   duplicate removal, the unified columns, sampled negatives, imputation and each request's first time run
   on it; the rows go to one of Q spill files by a hash of their user (the history key), the user's
   engagements to the events spill of the same bucket. Request first times are counted into a histogram.
3. **users**: with the cut-offs from that histogram, each user bucket gets its history join (every event of
   its users is in the bucket), the split and the down-sampling; the labeled rows are written, and value
   counts for the vocabularies are summed.

Then the vocabularies are fitted from the counts, and the labeled files are featurized file by file.

Why spill rather than DuckDB or Polars: the per-partition work is exactly the pure Arrow steps that the
Spark engine runs (:mod:`unirec.data.plan`), so a SQL engine would only replace the partitioning, and its
own dedupe, quantile and sort semantics would have to be proved equal to Spark's a second time. Spilling
by a content hash needs nothing beyond pyarrow, keeps one code path for the logic, and its memory is set
by one knob (``data.partition_rows``); the cost is one extra write and read of the data per pass.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unirec.data import history, labels
from unirec.data.features import COUNTS, Featurizer
from unirec.data.plan import (
    EVENTS,
    ROW_GROUP,
    Plan,
    ShardWriter,
    check_split_sizes,
    no_examples_error,
    popularity_from_counts,
    raw_batches,
    raw_rows,
    resolve,
    write_feature_set,
    write_table,
)


class Spill:
    """Rows appended to one of ``n`` parquet files by a bucket number; each file is read back whole."""

    def __init__(self, directory: Path, n: int):
        self.directory, self.n = directory, n
        self._writers: Dict[int, pq.ParquetWriter] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table, bucket: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.n + 1))
        for b in np.nonzero(np.diff(bounds))[0]:
            self.append(int(b), table.take(pa.array(order[bounds[b] : bounds[b + 1]])))

    def append(self, b: int, table: pa.Table) -> None:
        w = self._writers.get(b)
        if w is None:
            w = self._writers[b] = pq.ParquetWriter(self.directory / f"{b:05d}.parquet", table.schema)
        w.write_table(table)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def read(self, b: int) -> Optional[pa.Table]:
        path = self.directory / f"{b:05d}.parquet"
        return pq.read_table(path) if path.exists() else None


class Writer:
    """One parquet file written in pieces (the rejects of a canvas)."""

    def __init__(self, path: Path):
        self.path, self._w = path, None

    def write(self, table: pa.Table) -> None:
        if self._w is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._w = pq.ParquetWriter(self.path, table.schema)
        self._w.write_table(table)

    def close(self, schema: pa.Schema) -> None:
        if self._w is None:
            self.write(schema.empty_table())
        self._w.close()


def build(raw_dir: Path, out: Path, plan: Plan) -> Dict:
    """Labels then features of ``plan`` into ``out`` (layout: :mod:`unirec.data.prepare`); returns the
    reject counts per task and reason."""
    spill = out / "_spill"
    sizes = {name: raw_rows(resolve(raw_dir, t.adapter.source)) for name, t in plan.tasks.items()}
    n_users = max(1, math.ceil(sum(sizes.values()) * 1.5 / plan.data.partition_rows))
    examples = {name: Spill(spill / "examples" / name, n_users) for name in plan.tasks}
    events = Spill(spill / "events", n_users)
    times: List[Tuple[np.ndarray, np.ndarray]] = []
    reject_counts: Dict[str, Dict[str, int]] = {}
    for name in sorted(plan.tasks):
        reject_counts[name] = _labels(
            plan, name, raw_dir, out, spill, sizes[name], examples[name], events, times
        )
    if plan.history_on and plan.history.source:
        for raw in raw_batches(resolve(raw_dir, plan.history.source)):
            ev = plan.source_events(raw)
            events.write(ev, history.user_buckets(ev["user"], n_users))
    events.close()
    (out / "rejects.json").write_text(json.dumps(reject_counts, indent=2, sort_keys=True))

    values, counts = _merge_histogram(times)
    cutoffs = labels.cutoffs_from_counts(values, counts, plan.data.split)
    fitted, popular, sizes_by_split, snapshot = _users(plan, out, examples, events, cutoffs)
    for name in sorted(plan.tasks):
        check_split_sizes(name, sizes_by_split[name], cutoffs)
        print(f"split   {name:<10} " + " ".join(f"{s}={n:,}" for s, n in sizes_by_split[name].items()))
    if snapshot is not None:
        n_events = snapshot.pop("events")
        print(
            f"history {plan.history.field}: {n_events:,} engagements of {snapshot['table'].num_rows:,} users"
        )
    shutil.rmtree(spill)

    feat, featurizer = write_feature_set(plan, fitted, out)
    for s in labels.SPLITS:
        for name in sorted(plan.tasks):
            _featurize(
                out / "labeled" / f"split={s}" / f"task={name}",
                feat / s / name,
                plan.data.rows_per_file,
                featurizer,
            )
    write_table(popularity_from_counts(popular, featurizer), feat / "popularity.parquet")
    if snapshot is not None:
        write_table(snapshot["table"], feat / history.SNAPSHOT)
    return reject_counts


def _labels(plan, name, raw_dir, out, spill, n_raw, examples: Spill, events: Spill, times) -> Dict[str, int]:
    """Passes 1 and 2 of one task: clean into request partitions, then per partition the request steps."""
    task = plan.tasks[name]
    # Sampled negatives multiply a positives-only log's rows: its partitions hold the examples, not the log.
    partitions = max(1, math.ceil(n_raw * labels.rows_per_logged_row(task) / plan.data.partition_rows))
    by_request = Spill(spill / "clean" / name, partitions)
    rejects = Writer(out / "rejects" / f"task={name}" / "part-00000.parquet")
    raw_columns: Optional[List[str]] = None
    for raw in raw_batches(resolve(raw_dir, task.adapter.source)):
        raw_columns = raw_columns or list(raw.column_names)
        cleaned = plan.clean(name, raw)
        rejects.write(cleaned.rejects)
        good = cleaned.good
        by_request.write(good, (history.user_buckets(good["__request"], partitions)))
    by_request.close()
    n_examples = 0
    events_of_task = plan.history_on and not plan.history.source and name in plan.event_tasks()
    for b in range(partitions):
        good = by_request.read(b)
        if good is None:
            continue
        if task.adapter.drop_duplicates:
            cleaned = labels.drop_duplicates(labels.Cleaned(good, _NO_REJECTS), raw_columns)
            good = cleaned.good
            if cleaned.rejects.num_rows:
                rejects.write(cleaned.rejects)
        ex = labels.with_first_time(plan.impute(plan.negatives(name, plan.examples(name, good))))
        n_examples += ex.num_rows
        req = ex.group_by(labels.REQUEST, use_threads=False).aggregate([(labels.FIRST_TIME, "min")])
        first = req[f"{labels.FIRST_TIME}_min"].to_numpy()
        times.append(np.unique(first, return_counts=True))
        examples.write(ex, plan.user_buckets(name, ex, examples.n))
        if events_of_task:
            ev = plan.events(ex)
            events.write(ev, history.user_buckets(ev["user"], events.n))
    rejects.close(_NO_REJECTS.schema)
    examples.close()
    shutil.rmtree(by_request.directory)
    counts = labels.count_reasons(pq.read_table(rejects.path))
    if n_examples == 0:
        raise no_examples_error(name, n_raw, task.adapter.source, counts)
    print(f"labels  {name:<10} raw={n_raw:>11,} rejected={sum(counts.values()):>9,}  {counts}")
    return counts


_NO_REJECTS = pa.table(
    {"reason": pa.array([], pa.string()), "row": pa.array([], pa.map_(pa.string(), pa.string()))}
)


def _merge_histogram(parts: List[Tuple[np.ndarray, np.ndarray]]) -> Tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inv = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inv, weights=counts).astype(np.int64)


def _downsample(plan: Plan, name: str, train_dir: Path, requests: List[np.ndarray]) -> Tuple[List, List, int]:
    """Pass 3b of a down-sampled task: its train files rewritten with the requests it keeps (a threshold
    on the requests' draws over the whole train split); returns their value counts, positives and rows."""
    task = plan.tasks[name]
    req = np.concatenate(requests) if requests else np.zeros(0, np.int64)
    threshold = labels.keep_threshold(
        labels.request_draw(req, task, plan.seed), labels.keep_count(len(req), task)
    )
    fitted, popular, rows = [], [], 0
    for f in sorted(train_dir.glob("*.parquet")):
        t = labels.downsample(pq.read_table(f), task, plan.seed, threshold)
        f.unlink()
        if t.num_rows:
            write_table(t, f)
            fitted.append(plan.fit_counts(name, t))
            popular.append(_positives(name, t))
            rows += t.num_rows
    return fitted, popular, rows


def _users(plan: Plan, out: Path, examples: Mapping[str, Spill], events: Spill, cutoffs):
    """Pass 3: per user bucket, the history join and the split; the labeled files; value counts."""
    sampled = {n for n, t in plan.tasks.items() if labels.keep_count(1, t) is not None}
    train_requests: Dict[str, List[np.ndarray]] = {n: [] for n in sampled}
    fitted, popular, snaps = [COUNTS.empty_table()], [], []
    sizes = {name: dict.fromkeys(labels.SPLITS, 0) for name in plan.tasks}
    n_events = 0
    for b in range(events.n):
        ev = events.read(b) if plan.history_on else None
        if ev is not None:
            n_events += ev.num_rows
            snaps.append(history.history_snapshot(ev, key="user", item="item", max_len=plan.history.max_len))
        for name in sorted(plan.tasks):
            ex = examples[name].read(b)
            if ex is None:
                continue
            if plan.has_history(name):
                ex = plan.attach_history(ex, ev if ev is not None else _no_events())
            for s, t in labels.split_batch(ex, cutoffs).items():
                if s == "train" and name in sampled:
                    train_requests[name].append(pc.unique(t[labels.REQUEST]).to_numpy())
                elif s == "train":
                    fitted.append(plan.fit_counts(name, t))
                    popular.append(_positives(name, t))
                sizes[name][s] += t.num_rows
                if t.num_rows:
                    write_table(t, out / "labeled" / f"split={s}" / f"task={name}" / f"part-{b:05d}.parquet")
        fitted = [_sum_counts(fitted)] if len(fitted) > 64 else fitted
    for name in sorted(sampled):
        train_dir = out / "labeled" / "split=train" / f"task={name}"
        f, p, sizes[name]["train"] = _downsample(plan, name, train_dir, train_requests[name])
        fitted += f
        popular += p
    snapshot = None
    if plan.history_on:
        table = (
            pa.concat_tables(snaps)
            if snaps
            else history.history_snapshot(_no_events(), key="user", item="item", max_len=1)
        )
        snapshot = {"table": table.sort_by("user"), "events": n_events}
    return _sum_counts(fitted), pa.concat_tables(popular) if popular else None, sizes, snapshot


def _no_events() -> pa.Table:
    return EVENTS.empty_table()


def _sum_counts(parts: List[pa.Table]) -> pa.Table:
    t = pa.concat_tables(parts).group_by(["field", "value"], use_threads=False).aggregate([("count", "sum")])
    return t.rename_columns(["field", "value", "count"]).select(COUNTS.names).cast(COUNTS)


def _positives(name: str, train: pa.Table) -> pa.Table:
    pos = train.filter(pc.greater(train[labels.LABEL], 0))
    vc = pc.value_counts(pos[labels.CANDIDATE])
    return pa.table(
        {
            "task": pa.array([name] * len(vc), pa.string()),
            "candidate": vc.field("values"),
            "count": pc.cast(vc.field("counts"), pa.int64()),
        }
    )


def _featurize(labeled: Path, directory: Path, rows_per_file: int, featurizer: Featurizer) -> None:
    """The labeled files of one split and task as feature shards of ``rows_per_file`` rows."""
    shards = ShardWriter(directory, featurizer, rows_per_file)
    files = sorted(labeled.glob("*.parquet"))
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=ROW_GROUP):
            shards.write(pa.Table.from_batches([batch]))
    shards.close(pq.read_schema(files[0]).empty_table())
