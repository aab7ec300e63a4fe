"""Feature extraction: vocabularies fitted on train, and the one ``Featurizer`` shared by training and serving.

:func:`fit` reads the train split only and returns a :class:`~unirec.schema.FeatureSpec` plus one
vocabulary per table. :class:`Featurizer` holds nothing but those fitted tables, so the service featurizes a
request with exactly the code that featurized the training shards. How each field is encoded is its kind's
business (:mod:`unirec.kinds`); this module only routes columns and tables.

Featurized columns (one row per example)::

    task_type        int32
    ctx.<field>      the kind's column: int32 (categorical) | fixed_size_list<int32>[L] (tokens, sequence)
                     | float32 (dense)
    has.<field>      uint8  presence bit of each context field (0: the sentinel stands in)
    cand.<field>     as ctx.<field>, for the candidate's fields
    label, weight    float32
    request_id       int64
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unirec.config import CandidateConfig, FieldConfig, TaskConfig
from unirec.data.ids import normalise_ids
from unirec.data.labels import CANDIDATE, LABEL, REQUEST, TASK_TYPE, WEIGHT
from unirec.kinds import FIRST_ID, kind_of, tokenize, vocabulary_lookup
from unirec.schema import (
    CandidateSpec,
    FeatureSpec,
    FieldSpec,
    SchemaError,
    TableSpec,
    TaskSpec,
    check_tables,
    table_name,
)

__all__ = [
    "COUNTS",
    "Featurizer",
    "Imputer",
    "feature_files",
    "fit",
    "fit_counts",
    "fit_from_counts",
    "save_vocabs",
    "tokenize",
]


class Imputer:
    """Context-aware imputation: fills a task's missing context fields from its other context fields or
    from a candidate feature of an id it holds (``query <- source_item.item_title``), on raw unified rows.

    Preparation applies it to the labeled rows (so vocabularies see imputed values) and the
    :class:`Featurizer` applies it again to whatever it featurizes, so evaluation and serving impute
    exactly as training did. Only null values are filled; applying it twice changes nothing.

    Args:
        rules: task type id -> {target field: source} (see ``TaskConfig.impute``).
        kinds: unified context field -> kind name (the target's raw type comes from its kind).
        catalogues: candidate type -> raw candidate table.
        keys: candidate type -> key column of its table.
        columns: candidate field -> (candidate type, table column).
    """

    def __init__(self, rules, kinds, catalogues, keys, columns):
        self.rules = {int(k): dict(v) for k, v in rules.items() if v}
        self.kinds, self.catalogues, self.columns = kinds, catalogues, columns
        self._ids = {c: normalise_ids(_as_array(cat[keys[c]])) for c, cat in catalogues.items()}

    @classmethod
    def from_spec(cls, spec: FeatureSpec, catalogues: Mapping[str, pa.Table]) -> Imputer:
        return cls(
            {t.id: t.impute for t in spec.tasks.values()},
            {k: f.kind for k, f in spec.context.items()},
            catalogues,
            {c: cs.key for c, cs in spec.candidates.items()},
            {f: (c, spec.candidate_fields[f].column) for c, cs in spec.candidates.items() for f in cs.fields},
        )

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __call__(self, table: pa.Table, task_id: Optional[int] = None) -> pa.Table:
        """Rows of ``table`` with their task's rules applied; the task comes from a ``task_type`` column
        or, for a table of one task's requests (serving), from ``task_id``."""
        if not self.rules or table.num_rows == 0:
            return table
        if TASK_TYPE in table.column_names:
            types = np.asarray(pc.fill_null(table[TASK_TYPE], -1))
        elif task_id is not None:
            types = np.full(table.num_rows, task_id)
        else:
            return table
        for tid, rules in self.rules.items():
            mine = types == tid
            if not mine.any():
                continue
            for target, source in rules.items():
                table = self._fill(table, target, self._source(table, source), pa.array(mine))
        return table

    def _source(self, table: pa.Table, source: str) -> pa.Array:
        name, _, cand = source.partition(".")
        col = _as_array(table[name]) if name in table.column_names else pa.nulls(table.num_rows, pa.string())
        if not cand:
            return col
        ctype, column = self.columns[cand]
        row = pc.index_in(normalise_ids(pc.cast(col, pa.string())), value_set=self._ids[ctype])
        return _as_array(self.catalogues[ctype][column]).take(row)

    def _fill(self, table: pa.Table, target: str, values: pa.Array, rows: pa.Array) -> pa.Table:
        raw = kind_of(self.kinds[target]).raw_type
        cur = _as_array(table[target]) if target in table.column_names else pa.nulls(table.num_rows, raw)
        new = pc.if_else(pc.and_(rows, pc.is_null(cur)), pc.cast(values, raw), pc.cast(cur, raw))
        if target in table.column_names:
            return table.set_column(table.schema.get_field_index(target), target, new)
        return table.append_column(target, new)


COUNTS = pa.schema([("field", pa.string()), ("value", pa.string()), ("count", pa.int64())])
"""What :func:`fit` needs of the train rows: how often each field holds each value (as text)."""


def fit_counts(
    train: pa.Table,
    task: str,
    tasks: Mapping[str, TaskConfig],
    ctx_fields: Mapping[str, FieldConfig],
    candidates: Mapping[str, CandidateConfig],
    impute: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> pa.Table:
    """The :data:`COUNTS` of one batch of ``task``'s train rows: a pure per-batch step, so an engine sums
    the counts of its batches (by field and value) and hands the sums to :func:`fit_from_counts`.

    A context field counts where the task has it or imputes it (imputed values belong to the vocabulary
    like logged ones); the candidate id field of the task's candidate type counts every train candidate.
    """
    rules = (impute or {}).get(task, {})
    parts = []
    for fname, cfg in ctx_fields.items():
        if fname in tasks[task].context or fname in rules:
            kind = kind_of(cfg)
            flat = kind.vocabulary_values(train[fname]) if kind.has_table else train[fname]
            parts.append(_value_counts(fname, flat))
    ccfg = candidates[tasks[task].candidate]
    parts.append(_value_counts(_id_field(ccfg), train[CANDIDATE]))
    return pa.concat_tables(parts) if parts else COUNTS.empty_table()


def fit(
    train: Mapping[str, pa.Table],
    tasks: Mapping[str, TaskConfig],
    ctx_fields: Mapping[str, FieldConfig],
    candidates: Mapping[str, CandidateConfig],
    catalogues: Mapping[str, pa.Table],
    impute: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> tuple[FeatureSpec, Dict[str, list]]:
    """Fit vocabularies (one per table) and dense statistics on whole train tables (task name -> table);
    see :func:`fit_from_counts`."""
    counts = [fit_counts(t, name, tasks, ctx_fields, candidates, impute) for name, t in train.items()]
    return fit_from_counts(
        pa.concat_tables([COUNTS.empty_table(), *counts]), tasks, ctx_fields, candidates, catalogues, impute
    )


def fit_from_counts(
    counts: pa.Table,
    tasks: Mapping[str, TaskConfig],
    ctx_fields: Mapping[str, FieldConfig],
    candidates: Mapping[str, CandidateConfig],
    catalogues: Mapping[str, pa.Table],
    impute: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> tuple[FeatureSpec, Dict[str, list]]:
    """Fit vocabularies (one per table) and dense statistics from the train split's value counts.

    Args:
        counts: :data:`COUNTS` rows of the train split (from :func:`fit_counts`, summed or not).
        tasks: the selected tasks' configs.
        ctx_fields: the unified context fields (see :func:`unirec.schema.unified_context`).
        candidates: candidate type -> its config.
        catalogues: candidate type -> its raw table (one row per candidate).
        impute: task name -> imputation rules in force (none when left out).

    Returns:
        The feature spec and the vocabularies (table name -> values, in index order from FIRST_ID). A
        table's vocabulary counts the train values of every field that reads it; a candidate field that is
        not the id counts each catalogue row whose id is in train once.
    """
    impute = {name: dict((impute or {}).get(name, {})) for name in tasks}
    by_field = _by_field(counts)
    configs: Dict[str, FieldConfig] = dict(ctx_fields)
    field_counts = {f: by_field.get(f, _NONE) for f in ctx_fields}
    stats_of = {f: _stats_values(cfg, *field_counts[f]) for f, cfg in ctx_fields.items()}
    cand_spec: Dict[str, CandidateSpec] = {}
    columns: Dict[str, Optional[str]] = {f: None for f in ctx_fields}
    for ctype, ccfg in candidates.items():
        id_field = _id_field(ccfg)
        cat = catalogues[ctype]
        in_train = cat.filter(
            pc.is_in(normalise_ids(cat[ccfg.key]), value_set=by_field.get(id_field, _NONE)[0])
        )
        for fname, fcfg in ccfg.fields.items():
            configs[fname], columns[fname] = fcfg, fcfg.column
            if fname == id_field:  # every train occurrence of a candidate counts
                field_counts[fname] = by_field.get(fname, _NONE)
                stats_of[fname] = _stats_values(fcfg, *field_counts[fname])
            else:  # each catalogue row in train counts once
                stats_of[fname] = _as_array(in_train[fcfg.column])
                kind = kind_of(fcfg)
                vc = _value_counts(
                    fname, kind.vocabulary_values(stats_of[fname]) if kind.has_table else stats_of[fname]
                )
                field_counts[fname] = (vc["value"].combine_chunks(), vc["count"].to_numpy())
        cand_spec[ctype] = CandidateSpec(ctype, ccfg.table, ccfg.key, id_field, tuple(ccfg.fields))
    check_tables(configs)
    specs = {f: _field_spec(f, cfg, stats_of[f], columns[f]) for f, cfg in configs.items()}
    tables, vocabs = _fit_tables(configs, field_counts)
    task_spec = {
        name: TaskSpec(
            name, t.id, t.candidate, tuple(sorted(t.context)), t.loss_weight, tuple(t.metrics), impute[name]
        )
        for name, t in sorted(tasks.items(), key=lambda kv: kv[1].id)
    }
    spec = FeatureSpec(
        {f: specs[f] for f in ctx_fields},
        cand_spec,
        {f: specs[f] for c in candidates.values() for f in c.fields},
        task_spec,
        tables,
    )
    return spec, vocabs


_NONE = (pa.array([], pa.string()), np.zeros(0, np.int64))  # the counts of a field without values


def _by_field(counts: pa.Table) -> Dict[str, Tuple[pa.Array, np.ndarray]]:
    """Field -> (values, summed counts) of :data:`COUNTS` rows."""
    summed = counts.group_by(["field", "value"], use_threads=False).aggregate([("count", "sum")])
    out = {}
    for fname in sorted(set(summed["field"].to_pylist())):
        mine = summed.filter(pc.equal(summed["field"], fname))
        out[fname] = (mine["value"].combine_chunks(), mine["count_sum"].to_numpy())
    return out


def _id_field(ccfg: CandidateConfig) -> str:
    return next(f for f, c in ccfg.fields.items() if c.column == ccfg.key)


def _value_counts(field: str, values) -> pa.Table:
    """:data:`COUNTS` rows of one field's values (nulls left out)."""
    vc = pc.value_counts(pc.drop_null(pc.cast(_as_array(values), pa.string())))
    n = len(vc)
    return pa.table(
        [pa.array([field] * n, pa.string()), vc.field("values"), pc.cast(vc.field("counts"), pa.int64())],
        schema=COUNTS,
    )


def _stats_values(cfg: FieldConfig, values: pa.Array, counts: np.ndarray) -> pa.Array:
    """What a field's kind fits its statistics on: the multiset that the value counts describe, sorted by
    value (dense fields parse the text back to floats), so the same numbers come out whatever order the
    rows were counted in. Kinds with a table fit no statistics, and their multiset (every history item of
    every train row) is never built."""
    if kind_of(cfg).has_table:
        return pa.array([], pa.string())
    text = values.to_numpy(zero_copy_only=False).astype(object)
    order = np.argsort(text, kind="stable")
    return pa.array(np.repeat(text[order], np.asarray(counts, np.int64)[order]), pa.string())


def _field_spec(name: str, cfg: FieldConfig, values: pa.Array, column: Optional[str]) -> FieldSpec:
    kind = kind_of(cfg)
    mean, std = kind.stats(values)
    return FieldSpec(name, cfg.kind, table_name(name, cfg), kind.max_len(cfg), column, mean, std)


def _fit_tables(
    configs: Mapping[str, FieldConfig], counts: Mapping[str, Tuple[pa.Array, np.ndarray]]
) -> Tuple[Dict[str, TableSpec], Dict[str, list]]:
    """One vocabulary per table over the train value counts of every field that reads it (decreasing
    count, ties by value: deterministic), or its hash buckets."""
    readers: Dict[str, List[str]] = {}
    for f, cfg in configs.items():
        t = table_name(f, cfg)
        if t is not None:
            readers.setdefault(t, []).append(f)
    tables: Dict[str, TableSpec] = {}
    vocabs: Dict[str, list] = {}
    for t, fields in readers.items():
        cfg = configs[fields[0]]
        if cfg.hash_buckets > 0:
            tables[t] = TableSpec(t, FIRST_ID + cfg.hash_buckets, cfg.hash_buckets)
            continue
        merged = (
            pa.table(
                {
                    "value": _concat([counts[f][0] for f in fields]),
                    "count": pa.array(np.concatenate([counts[f][1] for f in fields]).astype(np.int64)),
                }
            )
            .group_by("value", use_threads=False)
            .aggregate([("count", "sum")])
        )
        vals = merged["value"].to_numpy(zero_copy_only=False)
        cnts = merged["count_sum"].to_numpy()
        order = np.lexsort((vals, -cnts))
        vocabs[t] = [v for v, c in zip(vals[order].tolist(), cnts[order].tolist()) if c >= cfg.min_count]
        tables[t] = TableSpec(t, FIRST_ID + len(vocabs[t]), 0, f"vocab/{t}.json")
    return tables, vocabs


def feature_files(spec: FeatureSpec) -> Dict[str, str]:
    """Spec key -> path (relative to the features directory or artifact) of every file the featurizer
    reads besides the spec: each table's vocabulary and each candidate type's catalogue.

    A path that is empty, absolute or climbs out with ``..`` is a SchemaError naming its key: a spec read
    from an artifact must not make the service read a file from outside it.
    """
    files = {f"tables.{t.name}.vocab": t.vocab for t in spec.tables.values() if t.vocab}
    files.update({f"candidates.{c}": f"candidates/{c}.parquet" for c in spec.candidates})
    for key, rel in files.items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or "\\" in rel:
            raise SchemaError(
                f"feature spec {key}: {rel!r} must be a relative path inside the feature directory "
                "(no absolute path, no '..')"
            )
    return files


class Featurizer:
    """Raw unified rows -> model-ready columns, from a fitted spec and vocabularies only.

    Args:
        spec: the fitted feature spec.
        vocabs: table name -> vocabulary values (index FIRST_ID onwards).
        catalogues: candidate type -> raw candidate table (its features are joined by id).
    """

    def __init__(self, spec: FeatureSpec, vocabs: Mapping[str, list], catalogues: Mapping[str, pa.Table]):
        self.spec = spec
        self.impute = Imputer.from_spec(spec, catalogues)
        self.vocabs = {t: pa.array(vocabs.get(t, []), pa.string()) for t in spec.tables}
        """Table -> its vocabulary (index FIRST_ID onwards; empty for hashed tables)."""
        self._lookup = {
            t: vocabulary_lookup(self.vocabs[t], ts.hash_buckets) for t, ts in spec.tables.items()
        }
        self._cand_rows: Dict[str, pa.Array] = {}
        self._cand_cols: Dict[str, Dict[str, pa.Array]] = {}
        for ctype, cspec in spec.candidates.items():
            cat = catalogues[ctype]
            self._cand_rows[ctype] = normalise_ids(cat[cspec.key])
            # Row 0 is the all-sentinel row for ids missing from the catalogue.
            self._cand_cols[ctype] = {
                f: self._catalogue_column(spec.candidate_fields[f], cat)
                for f in cspec.fields
                if f != cspec.id_field
            }

    @classmethod
    def load(cls, directory: Path) -> Featurizer:
        """Load from a features directory (or an exported artifact with the same layout): the spec and the
        files :func:`feature_files` names, nothing outside ``directory``."""
        directory = Path(directory)
        spec = FeatureSpec.load(directory / "feature_spec.json")
        files = feature_files(spec)
        vocabs = {}
        for t in spec.tables.values():
            if t.vocab:
                try:
                    vocabs[t.name] = json.loads((directory / t.vocab).read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise ValueError(
                        f"cannot read vocabulary of table {t.name!r} from {directory / t.vocab}: {e}"
                    ) from e
        cats = {c: pq.read_table(directory / files[f"candidates.{c}"]) for c in spec.candidates}
        return cls(spec, vocabs, cats)

    def _catalogue_column(self, f: FieldSpec, catalogue: pa.Table) -> pa.Array:
        """A candidate field encoded for every catalogue row, after one leading all-sentinel row."""
        return pa.concat_arrays([kind_of(f).sentinels(f, 1), self.encode(f, catalogue[f.column])[0]])

    def catalogue_ids(self, ctype: str) -> pa.Array:
        """The catalogue's candidate ids (canonical text, see :func:`unirec.data.ids.normalise_ids`), in table order."""
        return self._cand_rows[ctype]

    def encode(self, f: FieldSpec, col) -> Tuple[pa.Array, pa.Array]:
        """One field's raw column -> (featurized column, presence bits), by its kind and its table."""
        return kind_of(f).encode(f, col, self._lookup.get(f.table))

    def context(self, table: pa.Table, task_id: Optional[int] = None) -> Dict[str, pa.Array]:
        """``ctx.<field>`` and ``has.<field>`` for every unified context field (absent columns are missing),
        after the imputation rules of each row's task (``task_type`` column, else ``task_id``)."""
        table = self.impute(table, task_id)
        out: Dict[str, pa.Array] = {}
        n = table.num_rows
        for name, f in self.spec.context.items():
            col = table[name] if name in table.column_names else pa.nulls(n, kind_of(f).raw_type)
            out[f"ctx.{name}"], out[f"has.{name}"] = self.encode(f, col)
        return out

    def candidates(self, ctype: str, ids: pa.Array) -> Dict[str, pa.Array]:
        """``cand.<field>`` for candidates of one type, joined from the catalogue by id (text)."""
        cspec = self.spec.candidates[ctype]
        ids = normalise_ids(_as_array(ids))
        row = pc.fill_null(pc.add(pc.index_in(ids, value_set=self._cand_rows[ctype]), 1), 0)
        out = {f"cand.{cspec.id_field}": self.encode(self.spec.candidate_fields[cspec.id_field], ids)[0]}
        for f, col in self._cand_cols[ctype].items():
            out[f"cand.{f}"] = col.take(row)
        return out

    def examples(self, table: pa.Table) -> pa.Table:
        """Featurize labeled examples of tasks that rank one candidate type into a shard table.

        Every shard carries every candidate type's ``cand.<field>`` columns, so shards of tasks that rank
        different types stack into one batch: the fields of the other types hold the sentinel (0).
        """
        cols: Dict[str, pa.Array] = {
            TASK_TYPE: pc.cast(table[TASK_TYPE], pa.int32()),
            REQUEST: table[REQUEST],
            LABEL: table[LABEL],
            WEIGHT: table[WEIGHT],
        }
        cols.update(self.context(table))
        by_id = {t.id: t.candidate for t in self.spec.tasks.values()}
        present = np.unique(np.asarray(table[TASK_TYPE]))
        ctypes = {by_id[int(i)] for i in present} or {next(iter(self.spec.candidates))}
        if len(ctypes) != 1:
            raise ValueError(
                f"examples of tasks ranking {sorted(ctypes)} together: featurize each type apart"
            )
        ctype = ctypes.pop()
        cols.update(self.candidates(ctype, table[CANDIDATE]))
        for f, fspec in self.spec.candidate_fields.items():
            cols.setdefault(f"cand.{f}", kind_of(fspec).sentinels(fspec, table.num_rows))
        return pa.table(cols)


def _as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _concat(arrays: Iterable, empty_type: Optional[pa.DataType] = None) -> pa.Array:
    chunks = [c for a in arrays for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
    return pa.chunked_array(
        chunks, type=chunks[0].type if chunks else empty_type or pa.string()
    ).combine_chunks()


def save_vocabs(directory: Path, spec: FeatureSpec, vocabs: Mapping[str, list]) -> None:
    for t in spec.tables.values():
        if t.vocab:
            path = Path(directory) / t.vocab
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(vocabs[t.name], ensure_ascii=False))
