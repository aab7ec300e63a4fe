"""The Spark preparation engine (``data.engine=spark``): the local engine's Arrow steps, on Apache Spark.

The per-batch steps of :class:`unirec.data.plan.Plan` run unchanged through ``mapInArrow``: cleaning with
rejects, the unified mapping, imputation, the split, value counts and featurization. The steps that need
every row of a request or of a user run the same pure functions per group (``groupBy(...).applyInArrow``,
``cogroup(...).applyInArrow``). The whole-data steps are DataFrame operations: duplicate removal (a window
over the raw columns), each request's first time (a window), the histogram of first times behind the time
cut-offs, the down-sampling threshold, vocabulary and popularity counts (``groupBy`` sums), and the
co-partitioning of requests and engagements by user for the point-in-time history join.

Files. Labeled rows and rejects go through Spark's parquet writer, into the local engine's layout
(``labeled/split=<s>/task=<t>/``, ``rejects/task=<t>/``), in any number of files. Feature shards are written
by the featurization step itself, with pyarrow, one file per Arrow batch: Spark's types have no
fixed-size list and no unsigned integer, and the shard contract (:mod:`unirec.data.batch`) is Arrow's, so
the shards carry exactly the local engine's schema and training reads them unchanged. Each file is written
under a temporary name and renamed, so a retried task leaves no half-written shard.

Only this module imports pyspark; nothing on the local path needs it or Java.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel, TaskContext
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

from unirec.config import LabelSource, SparkConfig
from unirec.data import history, labels
from unirec.data.features import Featurizer
from unirec.data.plan import (
    BATCH_ROWS,
    EVENTS,
    Plan,
    ShardWriter,
    check_split_sizes,
    no_examples_error,
    popularity_from_counts,
    raw_files,
    raw_rows,
    resolve,
    write_feature_set,
    write_table,
)

BUCKET, SPLIT_COL, TASK_COL, REASON, ROW = "__bucket", "split", "task", "reason", "row"
GROUP_ROWS = 1_000_000
"""Rows per group of a grouped step (negatives, history): a group is one Arrow table in a Python worker."""


def session(cfg: SparkConfig) -> SparkSession:
    """The Spark session of ``data.spark`` (an existing one is reused, with these SQL settings)."""
    builder = SparkSession.builder.appName("unirec-prepare")
    settings = {
        "spark.sql.shuffle.partitions": cfg.shuffle_partitions,
        "spark.sql.execution.arrow.maxRecordsPerBatch": BATCH_ROWS,
        # Int.MaxValue turns the byte limit off. Under any other value Spark measures the Arrow batch it is
        # filling after every row, and for list columns (the history) that measure walks the whole batch:
        # quadratic in the batch's rows, the JVM's time in every mapInArrow. Batches are bounded by rows.
        "spark.sql.execution.arrow.maxBytesPerBatch": 2**31 - 1,
        "spark.sql.execution.arrow.useLargeVarTypes": "false",
        "spark.sql.sources.partitionColumnTypeInference.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.ui.showConsoleProgress": "false",
    }
    if cfg.master is not None:  # started here, not by spark-submit: this interpreter runs the workers
        builder = builder.master(cfg.master)
        settings |= {
            "spark.driver.memory": cfg.driver_memory,
            "spark.ui.enabled": "false",
            "spark.pyspark.python": sys.executable,
            "spark.pyspark.driver.python": sys.executable,
        }
    for k, v in {**settings, **cfg.conf}.items():
        builder = builder.config(k, str(v))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.conf.set("spark.sql.shuffle.partitions", str(cfg.shuffle_partitions))
    return spark


def build(raw_dir: Path, out: Path, plan: Plan) -> Dict:
    """Labels then features of ``plan`` into ``out`` (layout: :mod:`unirec.data.prepare`); returns the
    reject counts per task and reason."""
    spark = session(plan.data.spark)
    stage = out / "_stage"
    reject_counts = {name: _labels(spark, plan, name, raw_dir, out, stage) for name in sorted(plan.tasks)}
    (out / "rejects.json").write_text(json.dumps(reject_counts, indent=2, sort_keys=True))
    examples = {name: spark.read.parquet(str(stage / "examples" / name)) for name in sorted(plan.tasks)}
    cutoffs = _cutoffs(examples, plan)
    events = _events(spark, plan, raw_dir, examples)
    for name, df in examples.items():
        if plan.has_history(name):
            df = _with_history(plan, name, df, events)
        _write_labeled(plan, name, df, cutoffs, out / "labeled")
    labeled = {
        name: spark.read.parquet(str(out / "labeled")).filter(F.col(TASK_COL) == name) for name in examples
    }
    for name, df in labeled.items():
        sizes = {s: n for s, n in df.groupBy(SPLIT_COL).count().collect()}
        sizes = {s: sizes.get(s, 0) for s in labels.SPLITS}
        check_split_sizes(name, sizes, cutoffs)
        print(f"split   {name:<10} " + " ".join(f"{s}={n:,}" for s, n in sizes.items()))
    snapshot = _snapshot(plan, events) if events is not None else None

    train = {
        name: df.filter(F.col(SPLIT_COL) == "train").drop(SPLIT_COL, TASK_COL) for name, df in labeled.items()
    }
    feat, featurizer = write_feature_set(plan, _fit_counts(plan, train), out)
    for s in labels.SPLITS:
        for name in sorted(plan.tasks):
            rows = spark.read.parquet(str(out / "labeled" / f"split={s}" / f"task={name}"))
            _write_shards(rows, featurizer, feat / s / name)
    write_table(popularity_from_counts(_positives(train), featurizer), feat / "popularity.parquet")
    if snapshot is not None:
        write_table(snapshot, feat / history.SNAPSHOT)
    shutil.rmtree(stage, ignore_errors=True)
    _tidy(out)
    return reject_counts


# ------------------------------------------------------------------------------------------------- steps


def _labels(
    spark: SparkSession, plan: Plan, name: str, raw_dir: Path, out: Path, stage: Path
) -> Dict[str, int]:
    """One task's labels: clean (mapInArrow) → duplicates (a window) → unified rows (mapInArrow) →
    negatives (per request group) → imputation (mapInArrow) → request first times (a window)."""
    task = plan.tasks[name]
    source = resolve(raw_dir, task.adapter.source)
    n_raw = raw_rows(source)
    raw = spark.read.parquet(*raw_files(source)) if n_raw else None
    if raw is None:
        raise FileNotFoundError(f"raw data {source} holds no rows (check adapter.source)")
    raw_columns = raw.columns
    cleaned = _map(raw, lambda t: _clean_rows(plan, name, t)).persist(StorageLevel.MEMORY_AND_DISK)
    rejects = cleaned.filter(F.col(REASON).isNotNull()).select(REASON, ROW)
    good = cleaned.filter(F.col(REASON).isNull()).drop(REASON, ROW)
    if task.adapter.drop_duplicates:
        copy = F.row_number().over(Window.partitionBy(*raw_columns).orderBy("__ts"))
        good = good.withColumn("__copy", copy)
        dups = _map(good.filter(F.col("__copy") > 1).select(*raw_columns), labels.duplicate_rejects)
        rejects = rejects.unionByName(dups)
        good = good.filter(F.col("__copy") == 1).drop("__copy")
    rejects.write.mode("overwrite").parquet(str(out / "rejects" / f"task={name}"))
    ex = _map(good, lambda t: plan.examples(name, t))
    if task.labels.source == LabelSource.positives:
        rows = n_raw * labels.rows_per_logged_row(task)
        ex = _per_group(ex, F.col(labels.REQUEST), rows, lambda t: plan.negatives(name, t))
    ex = _map(ex, plan.impute)
    ex = ex.withColumn(labels.FIRST_TIME, F.min(labels.TIMESTAMP).over(Window.partitionBy(labels.REQUEST)))
    ex.write.mode("overwrite").parquet(str(stage / "examples" / name))
    cleaned.unpersist()
    written = spark.read.parquet(str(out / "rejects" / f"task={name}"))
    counts = dict(sorted((r, n) for r, n in written.groupBy(REASON).count().collect()))
    if spark.read.parquet(str(stage / "examples" / name)).limit(1).count() == 0:
        raise no_examples_error(name, n_raw, task.adapter.source, counts)
    print(f"labels  {name:<10} raw={n_raw:>11,} rejected={sum(counts.values()):>9,}  {counts}")
    return counts


def _clean_rows(plan: Plan, name: str, raw: pa.Table) -> pa.Table:
    """:meth:`Plan.clean` as one table (one schema for mapInArrow): good rows with a null ``reason``,
    then rejects with their raw columns null."""
    c = plan.clean(name, raw)
    good = c.good.append_column(REASON, pa.nulls(c.good.num_rows, pa.string()))
    good = good.append_column(ROW, pa.nulls(c.good.num_rows, c.rejects.schema.field(ROW).type))
    bad = pa.table(
        {f.name: pa.nulls(c.rejects.num_rows, f.type) for f in c.good.schema}
        | {REASON: c.rejects[REASON], ROW: c.rejects[ROW]}
    )
    return pa.concat_tables([good, bad.select(good.column_names).cast(good.schema)])


def _cutoffs(examples: Dict[str, DataFrame], plan: Plan):
    """The time cut-offs from the histogram of request first times over every task."""
    firsts = None
    for df in examples.values():
        req = df.select(labels.REQUEST, labels.FIRST_TIME).distinct()
        firsts = req if firsts is None else firsts.unionByName(req)
    hist = firsts.groupBy(labels.FIRST_TIME).count().toArrow()
    return labels.cutoffs_from_counts(
        hist[labels.FIRST_TIME].to_numpy(), hist["count"].to_numpy(), plan.data.split
    )


def _events(
    spark: SparkSession, plan: Plan, raw_dir: Path, examples: Dict[str, DataFrame]
) -> Optional[DataFrame]:
    """The history engagements (``data.history.source`` or the event tasks' positives), or None."""
    if not plan.history_on:
        return None
    if plan.history.source:
        source = resolve(raw_dir, plan.history.source)
        return _map(spark.read.parquet(*raw_files(source)), plan.source_events)
    parts = [_map(examples[name], plan.events) for name in plan.event_tasks()]
    events = parts[0]
    for p in parts[1:]:
        events = events.unionByName(p)
    return events


def _with_history(plan: Plan, name: str, df: DataFrame, events: DataFrame) -> DataFrame:
    """Each row's history: requests and events co-grouped by user bucket, joined per group."""
    n = max(plan.data.spark.shuffle_partitions, math.ceil(df.count() / GROUP_ROWS))
    left = _map(df, lambda t: _bucketed(t, plan.user_buckets(name, t, n)))
    right = _map(events, lambda t: _bucketed(t, history.user_buckets(t["user"], n)))
    empty_left = to_arrow_schema(df.schema).empty_table()
    schema = plan.attach_history(empty_left, EVENTS.empty_table()).schema

    def join(requests: pa.Table, evs: pa.Table) -> pa.Table:
        return _as(plan.attach_history(requests.drop_columns([BUCKET]), evs.drop_columns([BUCKET])), schema)

    grouped = left.groupBy(BUCKET).cogroup(right.groupBy(BUCKET))
    return grouped.applyInArrow(join, from_arrow_schema(schema))


def _write_labeled(plan: Plan, name: str, df: DataFrame, cutoffs, labeled: Path) -> None:
    """The split of every row (mapInArrow), down-sampling of the train split, then the labeled files."""
    task = plan.tasks[name]
    split = _map(df, lambda t: _split_rows(t, cutoffs))
    if labels.keep_count(1, task) is not None:
        train_requests = split.filter(F.col(SPLIT_COL) == "train").select(labels.REQUEST).distinct()
        draws = _map(
            train_requests,
            lambda t: pa.table({"draw": labels.request_draw(t[labels.REQUEST], task, plan.seed)}),
        )
        n = draws.count()
        keep_n = labels.keep_count(n, task)
        threshold = -1.0
        if keep_n > 0:
            threshold = draws.orderBy("draw").limit(keep_n).agg(F.max("draw")).first()[0]
        split = _map(split, lambda t: _keep_train(t, task, plan.seed, threshold))
    split.withColumn(TASK_COL, F.lit(name)).write.mode("append").partitionBy(SPLIT_COL, TASK_COL).parquet(
        str(labeled)
    )


def _split_rows(t: pa.Table, cutoffs) -> pa.Table:
    parts = [
        s_t.append_column(SPLIT_COL, pa.array([s] * s_t.num_rows, pa.string()))
        for s, s_t in labels.split_batch(t, cutoffs).items()
    ]
    return pa.concat_tables(parts)


def _keep_train(t: pa.Table, task, seed: int, threshold: float) -> pa.Table:
    train = pc.equal(t[SPLIT_COL], "train")
    kept = labels.downsample(t.filter(train), task, seed, threshold)
    return pa.concat_tables([t.filter(pc.invert(train)), kept])


def _snapshot(plan: Plan, events: DataFrame) -> pa.Table:
    """Every user's latest history (per user bucket, the local engine's function), sorted by user."""
    n = plan.data.spark.shuffle_partitions
    schema = history.history_snapshot(EVENTS.empty_table(), key="user", item="item", max_len=1).schema
    counted = events.count()

    def snap(t: pa.Table) -> pa.Table:
        s = history.history_snapshot(
            t.drop_columns([BUCKET]), key="user", item="item", max_len=plan.history.max_len
        )
        return _as(s, schema)

    bucketed = _map(events, lambda t: _bucketed(t, history.user_buckets(t["user"], n)))
    table = bucketed.groupBy(BUCKET).applyInArrow(snap, from_arrow_schema(schema)).toArrow()
    print(f"history {plan.history.field}: {counted:,} engagements of {table.num_rows:,} users")
    return _as(table, schema).sort_by("user")


def _fit_counts(plan: Plan, train: Dict[str, DataFrame]) -> pa.Table:
    """Value counts of every train row (mapInArrow per batch), summed by field and value."""
    counts = None
    for name, df in train.items():
        c = _map(df, lambda t, name=name: plan.fit_counts(name, t))
        counts = c if counts is None else counts.unionByName(c)
    summed = counts.groupBy("field", "value").agg(F.sum("count").alias("count"))
    return summed.toArrow().cast(
        pa.schema([("field", pa.string()), ("value", pa.string()), ("count", pa.int64())])
    )


def _positives(train: Dict[str, DataFrame]) -> Optional[pa.Table]:
    """Train positives per (task, candidate id): the popularity counts."""
    parts = [
        df.filter(F.col(labels.LABEL) > 0).groupBy(labels.CANDIDATE).count().withColumn(TASK_COL, F.lit(name))
        for name, df in train.items()
    ]
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p)
    t = out.toArrow()
    return pa.table(
        {"task": t[TASK_COL], "candidate": t[labels.CANDIDATE], "count": pc.cast(t["count"], pa.int64())}
    )


def _write_shards(rows: DataFrame, featurizer: Featurizer, directory: Path) -> None:
    """Featurize every batch in its Spark task and write it as one shard with pyarrow (see the module)."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(batches):
        part = TaskContext.get().partitionId()
        for i, b in enumerate(batches):
            shards = ShardWriter(directory, featurizer, max(b.num_rows, 1), prefix=f"part-{part:05d}-{i:05d}")
            shards.write(pa.Table.from_batches([b]))
            yield pa.RecordBatch.from_pydict({"files": [shards.close(b.schema.empty_table())]})

    rows.mapInArrow(write, "files long").agg(F.sum("files")).first()
    if not any(directory.glob("*.parquet")):  # an empty split still has one (empty) shard with the schema
        ShardWriter(directory, featurizer, 1).close(to_arrow_schema(rows.schema).empty_table())


# ----------------------------------------------------------------------------------------------- helpers


def _map(df: DataFrame, fn: Callable[[pa.Table], pa.Table]) -> DataFrame:
    """``df.mapInArrow`` of a pure table function; its output schema is its output on no rows."""
    schema = _spark_arrow(fn(to_arrow_schema(df.schema).empty_table()).schema)

    def run(batches):
        for b in batches:
            t = _as(fn(pa.Table.from_batches([b])), schema)
            yield from t.to_batches()

    return df.mapInArrow(run, from_arrow_schema(schema))


def _per_group(df: DataFrame, key, rows: int, fn: Callable[[pa.Table], pa.Table]) -> DataFrame:
    """``fn`` on groups that hold every row of each ``key`` value (a hash bucket of it, see GROUP_ROWS)."""
    n = max(1, math.ceil(rows / GROUP_ROWS))
    schema = _spark_arrow(fn(to_arrow_schema(df.schema).empty_table()).schema)
    bucketed = df.withColumn(BUCKET, F.pmod(F.xxhash64(key), F.lit(n)))
    return bucketed.groupBy(BUCKET).applyInArrow(
        lambda t: _as(fn(t.drop_columns([BUCKET])), schema), from_arrow_schema(schema)
    )


def _bucketed(t: pa.Table, bucket) -> pa.Table:
    return t.append_column(BUCKET, pa.array(bucket, pa.int64()))


def _spark_arrow(schema: pa.Schema) -> pa.Schema:
    """The Arrow schema Spark hands back for ``schema`` (its own names and widths for the same types)."""
    return to_arrow_schema(from_arrow_schema(schema))


def _as(t: pa.Table, schema: pa.Schema) -> pa.Table:
    return t.select(schema.names).cast(schema)


def _tidy(out: Path) -> None:
    """Spark's bookkeeping files (``_SUCCESS`` markers, checksums) out of the prepared layout, whose own
    ``_SUCCESS`` marks a finished preparation."""
    for p in list(out.rglob("_SUCCESS")) + list(out.rglob(".*.crc")):
        p.unlink()
