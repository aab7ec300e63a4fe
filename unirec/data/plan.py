"""What both preparation engines share: the plan of one preparation and its pure Arrow-batch steps.

:class:`Plan` is built once, on the driver, from the config and the candidate catalogues. Its methods are
the per-batch steps, pure functions of Arrow tables that both engines run unchanged: the local engine
(:mod:`unirec.data.engine_local`) on the batches and hash partitions it streams through parquet, the Spark
engine (:mod:`unirec.data.engine_spark`) through ``mapInArrow`` and grouped ``applyInArrow``. The steps
that need all rows at once (duplicates, request first times, the cut-offs, the down-sampling threshold,
value counts, the history join's partitioning by user) are the engines' own business; each of them
reduces to one of the functions here on the rows it gathered.

The order of the steps, per task: :meth:`Plan.clean` (rejects with a reason) → duplicate removal (needs all
copies of a row) → :meth:`Plan.examples` (unified columns) → :meth:`Plan.negatives` (needs every row of a
request) → :meth:`Plan.impute` → history join (:meth:`Plan.attach_history`, needs every event of a user) →
split (:func:`unirec.data.labels.split_batch`) and down-sampling → value counts (:meth:`Plan.fit_counts`)
→ featurization with the fitted vocabularies.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unirec.config import CandidateConfig, DataConfig, FieldConfig, HistoryConfig, TaskConfig
from unirec.data import history, labels
from unirec.data.features import Featurizer, Imputer, fit_counts, fit_from_counts, save_vocabs
from unirec.schema import active_rules, table_name, unified_context, used_candidates, with_history

BATCH_ROWS = 262_144
"""Raw rows read per batch by the local engine (and at most per Arrow batch that Spark hands a step)."""
USER, ITEM = "user", "item"
"""Columns of the history events table (with ``timestamp`` and optionally ``event_order``)."""


@dataclass
class Plan:
    """One preparation: the tasks (with the history field), the unified context, the catalogues and the
    rules in force. Picklable, so Spark ships it to its Python workers inside each step's closure."""

    data: DataConfig
    tasks: Dict[str, TaskConfig]
    candidates: Dict[str, CandidateConfig]
    ctx_fields: Dict[str, FieldConfig]
    catalogues: Dict[str, pa.Table]
    impute_rules: Dict[str, Dict[str, str]]
    imputer: Imputer
    seed: int
    latest: Optional[int]
    """Last accepted event time (epoch s), see ``data.max_future_s``; None: no upper bound."""

    @classmethod
    def make(
        cls,
        raw_dir: Path,
        data: DataConfig,
        tasks: Mapping[str, TaskConfig],
        seed: int,
        now: Optional[float] = None,
    ) -> Plan:
        """``now`` (epoch s, default: read once here) anchors the horizon of event times."""
        now = time.time() if now is None else now
        latest = None if data.max_future_s is None else int(now) + data.max_future_s
        candidates = used_candidates(tasks, data.candidates)
        tasks = with_history(tasks, data.history, candidates)
        ctx_fields = unified_context(tasks)
        catalogues = {c: read_raw(resolve(raw_dir, cfg.table)) for c, cfg in candidates.items()}
        rules = {name: active_rules(t, ctx_fields) if data.impute else {} for name, t in tasks.items()}
        imputer = Imputer(
            {t.id: rules[name] for name, t in tasks.items()},
            {k: v.kind for k, v in ctx_fields.items()},
            catalogues,
            {c: cfg.key for c, cfg in candidates.items()},
            {f: (c, fc.column) for c, cfg in candidates.items() for f, fc in cfg.fields.items()},
        )
        return cls(data, dict(tasks), candidates, ctx_fields, catalogues, rules, imputer, seed, latest)

    # ------------------------------------------------------------------------------ what the plan says

    @property
    def history(self) -> HistoryConfig:
        return self.data.history

    @property
    def history_on(self) -> bool:
        """Whether some selected task receives the history field (see :func:`unirec.schema.with_history`)."""
        return any(self.history.field in t.context for t in self.tasks.values())

    def has_history(self, name: str) -> bool:
        return self.history_on and self.history.field in self.tasks[name].context

    def event_tasks(self) -> List[str]:
        """Tasks whose positives are the history's engagements (without ``data.history.source``): those
        whose requests have the key and whose candidates carry the history table's ids."""
        cfg, out = self.history, []
        for name, task in sorted(self.tasks.items()):
            cand = self.candidates[task.candidate]
            holds = any(table_name(f, c) == cfg.table for f, c in cand.fields.items() if c.column == cand.key)
            if cfg.key in task.context and holds:
                out.append(name)
        if self.history_on and not cfg.source and not out:
            raise ValueError(
                f"data.history: no task has {cfg.key!r} and ranks {cfg.table!r} ids; set data.history.source"
            )
        return out

    def catalogue_ids(self, name: str) -> pa.Array:
        task = self.tasks[name]
        return self.catalogues[task.candidate][self.candidates[task.candidate].key].combine_chunks()

    # ------------------------------------------------------------------------------ the per-batch steps

    def clean(self, name: str, raw: pa.Table) -> labels.Cleaned:
        """Typed good rows and rejects of one raw batch (per row)."""
        return labels.clean_batch(raw, self.tasks[name], self.catalogue_ids(name), self.latest)

    def examples(self, name: str, good: pa.Table) -> pa.Table:
        """Cleaned rows -> unified example columns (per row)."""
        return labels.to_examples(good, self.tasks[name], self.ctx_fields)

    def negatives(self, name: str, examples: pa.Table) -> pa.Table:
        """Sampled negatives added (positives-only tasks); ``examples`` holds whole requests."""
        return labels.sample_negatives(examples, self.tasks[name], self.catalogue_ids(name), self.seed)

    def impute(self, examples: pa.Table) -> pa.Table:
        """The imputation rules applied (per row)."""
        return self.imputer(examples)

    def events(self, examples: pa.Table) -> pa.Table:
        """The history engagements in a batch of an event task's examples: its positives."""
        pos = examples.filter(pc.greater(examples[labels.LABEL], 0))
        order = pos[labels.ORDER] if labels.ORDER in pos.column_names else None
        return _events(pos[self.history.key], pos[labels.CANDIDATE], pos[labels.TIMESTAMP], order)

    def source_events(self, raw: pa.Table) -> pa.Table:
        """The history engagements in a batch of ``data.history.source``."""
        cfg = self.history
        wanted = [cfg.user, cfg.item, cfg.timestamp] + ([cfg.order] if cfg.order else [])
        missing = [c for c in wanted if c not in raw.column_names]
        if missing:
            raise KeyError(
                f"data.history.source {cfg.source!r} lacks column(s) {missing}; it has {raw.column_names}"
            )
        order = raw[cfg.order] if cfg.order else None
        return _events(raw[cfg.user], raw[cfg.item], raw[cfg.timestamp], order)

    def attach_history(self, examples: pa.Table, events: pa.Table) -> pa.Table:
        """Each row's point-in-time history as the history field; ``events`` holds every engagement of
        the users in ``examples`` (one partition of users)."""
        cfg = self.history
        hist = history.history_for_partition(
            examples, events, key=USER, item=ITEM, max_len=cfg.max_len, request_key=cfg.key
        )
        i = examples.schema.get_field_index(cfg.field)
        return examples.set_column(i, cfg.field, hist) if i >= 0 else examples.append_column(cfg.field, hist)

    def user_buckets(self, name: str, examples: pa.Table, partitions: int):
        """The user partition of each row (by the history key; by request where the task has no key)."""
        if self.history.key in self.tasks[name].context:
            return history.user_buckets(examples[self.history.key], partitions)
        return history.user_buckets(examples[labels.REQUEST], partitions)

    def fit_counts(self, name: str, train: pa.Table) -> pa.Table:
        """Value counts of a batch of train rows (see :func:`unirec.data.features.fit_counts`)."""
        return fit_counts(train, name, self.tasks, self.ctx_fields, self.candidates, self.impute_rules)


EVENTS = pa.schema(
    [(USER, pa.string()), (ITEM, pa.string()), ("timestamp", pa.int64()), (history.ORDER, pa.int64())]
)
"""The history engagements, whatever their source: one schema, so every engine can stack them."""


def _events(user, item, timestamp, order) -> pa.Table:
    n = len(user)
    order = pa.nulls(n, pa.int64()) if order is None else order
    return pa.table([user, item, timestamp, order], names=EVENTS.names).cast(EVENTS)


# ---------------------------------------------------------------------------------------------- raw files


def read_raw(path: Path) -> pa.Table:
    """A raw parquet file or directory of parts, whole, in file order (deterministic)."""
    return pa.concat_tables(list(raw_batches(path, None)))


def raw_batches(path: Path, batch_rows: Optional[int] = BATCH_ROWS) -> Iterator[pa.Table]:
    """A raw parquet file or directory of parts as tables of at most ``batch_rows`` rows (None: one per
    file), file by file; a missing path or an unreadable file is an error that names it."""
    if not path.exists():
        raise FileNotFoundError(f"raw data {path} does not exist (check adapter.source / candidates.*.table)")
    files = raw_files(path)
    if not files:
        raise FileNotFoundError(f"no parquet files under {path}")
    schema = None
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            if batch_rows is None:
                yield _unified(pf.read(), schema, f, path)
            else:
                for b in pf.iter_batches(batch_size=batch_rows):
                    yield _unified(pa.Table.from_batches([b]), schema, f, path)
            schema = schema or pf.schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"raw data {f} is not a readable parquet file: {e}") from e


def _unified(table: pa.Table, schema: Optional[pa.Schema], file: str, path: Path) -> pa.Table:
    """A part of a raw data set with the schema of its first part (one table, one schema)."""
    if schema is None or table.schema.equals(schema):
        return table
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, pa.ArrowException) as e:
        raise ValueError(
            f"raw data {file} has columns {table.schema} unlike the other parts of {path}"
        ) from e


def raw_rows(path: Path) -> int:
    """Rows of a raw data set, from its parquet footers (0 when it does not exist)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in raw_files(path)) if path.exists() else 0


def raw_files(path: Path) -> list:
    """The parquet files of a raw file or directory of parts, in file order."""
    return [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))


def resolve(raw_dir: Path, source: str) -> Path:
    p = Path(source).expanduser()
    return p if p.is_absolute() else raw_dir / p


# ------------------------------------------------------------------------- what both engines do on the driver


ROW_GROUP = 16_384
"""Rows per parquet row group of the prepared layout: small enough for the loader's bounded shuffle."""


def write_table(table: pa.Table, path: Path) -> None:
    """One parquet file of the prepared layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=ROW_GROUP)


class ShardWriter:
    """Labeled rows -> feature shards, featurized one row group at a time (memory: one row group), in
    files of at most ``rows_per_file`` rows named ``<prefix>-<n>.parquet``. A file is written under a
    temporary name and renamed when complete, so a retried or interrupted writer leaves no half shard."""

    def __init__(self, directory: Path, featurizer, rows_per_file: int, prefix: str = "part"):
        self.directory, self.featurizer, self.rows_per_file, self.prefix = (
            directory,
            featurizer,
            rows_per_file,
            prefix,
        )
        self._w: Optional[pq.ParquetWriter] = None
        self._rows = self._files = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, labeled: pa.Table) -> None:
        for start in range(0, labeled.num_rows, ROW_GROUP):
            self._append(self.featurizer.examples(labeled.slice(start, ROW_GROUP)))

    def close(self, empty: pa.Table) -> int:
        """Finish the last file; with no rows at all, one empty shard featurized from ``empty`` (the labeled
        schema, no rows) keeps the schema on disk. Returns the files written."""
        if self._w is None and self._files == 0:
            self._append(self.featurizer.examples(empty))
        self._roll()
        return self._files

    def _append(self, shard: pa.Table) -> None:
        if self._w is not None and self._rows + shard.num_rows > self.rows_per_file:
            self._roll()
        if self._w is None:
            self._tmp = self.directory / f".{self.prefix}-{self._files:05d}.tmp"
            self._w = pq.ParquetWriter(self._tmp, shard.schema)
        self._w.write_table(shard, row_group_size=ROW_GROUP)
        self._rows += shard.num_rows

    def _roll(self) -> None:
        if self._w is not None:
            self._w.close()
            self._tmp.rename(self.directory / f"{self.prefix}-{self._files:05d}.parquet")
            self._w, self._rows, self._files = None, 0, self._files + 1


def no_examples_error(name: str, n_raw: int, source: str, counts: Mapping[str, int]) -> ValueError:
    """Said at the labels, before the time split blames the logs' span."""
    return ValueError(
        f"task {name} has no examples: every one of the {n_raw:,} rows of its log {source!r} was rejected "
        f"{dict(counts)}; fix the log or task.{name}.adapter"
    )


def check_split_sizes(name: str, sizes: Mapping[str, int], cutoffs) -> None:
    empty = [s for s, n in sizes.items() if n == 0]
    if empty:
        raise ValueError(
            f"task {name} has no {'/'.join(empty)} examples with the shared time cut-offs {cutoffs} (epoch s): "
            f"its logs do not span the data set's period; adjust data.split or the task's logs"
        )


def write_feature_set(plan: Plan, counts, out: Path):
    """Fit the spec and vocabularies from the train value ``counts`` (:func:`fit_counts`, summed) and write
    ``out/features``: the spec (with which field is the history and whose it is, so the service resolves it
    by user), the vocabularies and the candidate catalogues. Returns (features directory, featurizer)."""
    spec, vocabs = fit_from_counts(
        counts, plan.tasks, plan.ctx_fields, plan.candidates, plan.catalogues, plan.impute_rules
    )
    if plan.history_on:
        extras = {"history": {"field": plan.history.field, "key": plan.history.key}}
        spec = dataclasses.replace(spec, extras=extras)
    feat = out / "features"
    feat.mkdir(parents=True, exist_ok=True)
    spec.save(feat / "feature_spec.json")
    save_vocabs(feat, spec, vocabs)
    for c, t in plan.catalogues.items():
        write_table(t, feat / "candidates" / f"{c}.parquet")
    return feat, Featurizer(spec, vocabs, plan.catalogues)


def popularity_from_counts(counts: Optional[pa.Table], featurizer) -> pa.Table:
    """Train engagements per (task, candidate id index), from train positives counted per (task,
    candidate id text): the popularity baseline's scores. Ids outside the vocabulary pool in its OOV index."""
    spec, parts = featurizer.spec, []
    counts = counts if counts is not None else pa.table({"task": [], "candidate": [], "count": []})
    for name in sorted(spec.tasks):
        mine = counts.filter(pc.equal(counts["task"], name)) if counts.num_rows else counts
        ctype = spec.tasks[name].candidate
        id_field = spec.candidates[ctype].id_field
        size = spec.table_of(id_field).size
        if mine.num_rows:
            idx = featurizer.candidates(ctype, mine["candidate"])[f"cand.{id_field}"].to_numpy()
            total = np.bincount(idx, weights=mine["count"].to_numpy(), minlength=size).astype(np.int64)
        else:
            total = np.zeros(size, np.int64)
        nz = np.nonzero(total)[0]
        parts.append(pa.table({"task": [name] * len(nz), "index": nz.astype(np.int32), "count": total[nz]}))
    return pa.concat_tables(parts)
