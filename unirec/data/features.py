"""Feature extraction: vocabularies fitted on train, and the one ``Featurizer`` shared by training and serving.

:func:`fit` reads the train split only and returns a :class:`~unirec.schema.FeatureSpec` plus vocabularies.
:class:`Featurizer` holds nothing but those fitted tables, so the service featurizes a request with exactly
the code that featurized the training shards.

Featurized columns (one row per example)::

    task_type        int32
    ctx.<field>      int32 (categorical) | fixed_size_list<int32>[max_len] (tokens) | float32 (dense)
    has.<field>      uint8  presence bit of each context field (0: the sentinel stands in)
    cand.<field>     as ctx.<field>, for the candidate's fields
    label, weight    float32
    request_id       int64
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unirec.config import CandidateConfig, FieldConfig, FieldKind, TaskConfig
from unirec.data.ids import normalise_ids
from unirec.data.labels import CANDIDATE, LABEL, REQUEST, TASK_TYPE, WEIGHT
from unirec.schema import FIRST_ID, OOV, SENTINEL, CandidateSpec, FeatureSpec, FieldSpec, TaskSpec

# Tokens: lower-cased runs of letters or digits; everything else separates.
_TOKEN_SPLIT = r"[^\p{L}\p{N}]+"


def tokenize(text: pa.Array) -> pa.ListArray:
    """Lower-cased word tokens of each string (null stays null, separators drop out).

    >>> tokenize(pa.array(["Comedy|Drama", None])).to_pylist()
    [['comedy', 'drama'], None]
    """
    parts = pc.split_pattern_regex(pc.utf8_lower(_as_array(text)), _TOKEN_SPLIT)
    flat = pc.list_flatten(parts)
    parents = pc.list_parent_indices(parts).to_numpy()
    keep = np.asarray(pc.not_equal(flat, ""), dtype=bool)
    counts = np.bincount(parents[keep], minlength=len(parts))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)), mask=pc.is_null(parts))


class Imputer:
    """Context-aware imputation: fills a task's missing context fields from its other context fields or
    from a candidate feature of an id it holds (``query <- source_item.item_title``), on raw unified rows.

    Preparation applies it to the labeled rows (so vocabularies see imputed values) and the
    :class:`Featurizer` applies it again to whatever it featurizes, so evaluation and serving impute
    exactly as training did. Only null values are filled; applying it twice changes nothing.

    Args:
        rules: task type id -> {target field: source} (see ``TaskConfig.impute``).
        kinds: unified context field -> kind (the target's raw type: dense is float64, else text).
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
        raw = pa.float64() if self.kinds[target] == FieldKind.dense.value else pa.string()
        cur = _as_array(table[target]) if target in table.column_names else pa.nulls(table.num_rows, raw)
        new = pc.if_else(pc.and_(rows, pc.is_null(cur)), pc.cast(values, raw), pc.cast(cur, raw))
        if target in table.column_names:
            return table.set_column(table.schema.get_field_index(target), target, new)
        return table.append_column(target, new)


def fit(
    train: Mapping[str, pa.Table],
    tasks: Mapping[str, TaskConfig],
    ctx_fields: Mapping[str, FieldConfig],
    candidates: Mapping[str, CandidateConfig],
    catalogues: Mapping[str, pa.Table],
    impute: Optional[Mapping[str, Mapping[str, str]]] = None,
) -> tuple[FeatureSpec, Dict[str, list]]:
    """Fit vocabularies and dense statistics on the train split only.

    Args:
        train: task name -> labeled train table.
        tasks: the selected tasks' configs.
        ctx_fields: the unified context fields (see :func:`unirec.schema.unified_context`).
        candidates: candidate type -> its config.
        catalogues: candidate type -> its raw table (one row per candidate).

        impute: task name -> imputation rules in force (none when left out).

    Returns:
        The feature spec and the vocabularies (field name -> values, in index order from FIRST_ID).
    """
    impute = {name: dict((impute or {}).get(name, {})) for name in tasks}
    vocabs: Dict[str, list] = {}
    ctx_spec: Dict[str, FieldSpec] = {}
    for fname, fcfg in ctx_fields.items():
        # Imputed values (train is already imputed) belong to the vocabulary like logged ones.
        values = [
            t[fname] for name, t in train.items() if fname in tasks[name].context or fname in impute[name]
        ]
        ctx_spec[fname], vocab = _fit_field(fname, fcfg, _concat(values), column=None)
        if vocab is not None:
            vocabs[fname] = vocab
    cand_spec: Dict[str, CandidateSpec] = {}
    cand_fields: Dict[str, FieldSpec] = {}
    for ctype, ccfg in candidates.items():
        seen = _concat([t[CANDIDATE] for name, t in train.items() if tasks[name].candidate == ctype])
        cat = catalogues[ctype]
        in_train = cat.filter(pc.is_in(normalise_ids(cat[ccfg.key]), value_set=pc.unique(seen)))
        id_field = None
        for fname, fcfg in ccfg.fields.items():
            is_id = fcfg.column == ccfg.key
            values = seen if is_id else in_train[fcfg.column]
            cand_fields[fname], vocab = _fit_field(fname, fcfg, values, column=fcfg.column)
            if vocab is not None:
                vocabs[fname] = vocab
            id_field = fname if is_id else id_field
        cand_spec[ctype] = CandidateSpec(ctype, ccfg.table, ccfg.key, id_field, tuple(ccfg.fields))
    task_spec = {
        name: TaskSpec(
            name, t.id, t.candidate, tuple(sorted(t.context)), t.loss_weight, tuple(t.metrics), impute[name]
        )
        for name, t in sorted(tasks.items(), key=lambda kv: kv[1].id)
    }
    return FeatureSpec(ctx_spec, cand_spec, cand_fields, task_spec), vocabs


def _fit_field(name: str, cfg: FieldConfig, values, column: Optional[str]):
    kind = FieldKind(cfg.kind)
    if kind == FieldKind.dense:
        x = np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        x = x[np.isfinite(x)]
        mean, std = (float(x.mean()), float(x.std()) or 1.0) if len(x) else (0.0, 1.0)
        return FieldSpec(name, kind.value, column=column, mean=mean, std=std), None
    max_len = cfg.max_len if kind == FieldKind.tokens else 1
    if kind == FieldKind.tokens:
        values = pc.list_flatten(tokenize(values))
    if cfg.hash_buckets > 0:
        size = FIRST_ID + cfg.hash_buckets
        return FieldSpec(name, kind.value, size, max_len, cfg.hash_buckets, column=column), None
    counts = pc.value_counts(pc.drop_null(pc.cast(_as_array(values), pa.string())))
    vals, cnts = counts.field("values").to_numpy(zero_copy_only=False), counts.field("counts").to_numpy()
    order = np.lexsort((vals, -cnts))  # by decreasing count, ties by value: deterministic
    vocab = [v for v, c in zip(vals[order].tolist(), cnts[order].tolist()) if c >= cfg.min_count]
    spec = FieldSpec(name, kind.value, FIRST_ID + len(vocab), max_len, 0, f"vocab/{name}.json", column)
    return spec, vocab


class Featurizer:
    """Raw unified rows -> model-ready columns, from a fitted spec and vocabularies only.

    Args:
        spec: the fitted feature spec.
        vocabs: field name -> vocabulary values (index FIRST_ID onwards).
        catalogues: candidate type -> raw candidate table (its features are joined by id).
    """

    def __init__(self, spec: FeatureSpec, vocabs: Mapping[str, list], catalogues: Mapping[str, pa.Table]):
        self.spec = spec
        self.impute = Imputer.from_spec(spec, catalogues)
        self._vocab = {k: pa.array(v, pa.string()) for k, v in vocabs.items()}
        self._cand_rows: Dict[str, pa.Array] = {}
        self._cand_cols: Dict[str, Dict[str, np.ndarray]] = {}
        for ctype, cspec in spec.candidates.items():
            cat = catalogues[ctype]
            self._cand_rows[ctype] = normalise_ids(cat[cspec.key])
            # Row 0 is the all-sentinel row for ids missing from the catalogue.
            self._cand_cols[ctype] = {
                f: _prepend_sentinel(
                    self._encode(spec.candidate_fields[f], cat[spec.candidate_fields[f].column])
                )
                for f in cspec.fields
                if f != cspec.id_field
            }

    @classmethod
    def load(cls, directory: Path) -> Featurizer:
        """Load from a features directory (or an exported artifact with the same layout)."""
        directory = Path(directory)
        spec = FeatureSpec.load(directory / "feature_spec.json")
        vocabs = {}
        for f in [*spec.context.values(), *spec.candidate_fields.values()]:
            if f.vocab:
                try:
                    vocabs[f.name] = json.loads((directory / f.vocab).read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise ValueError(
                        f"cannot read vocabulary of field {f.name!r} from {directory / f.vocab}: {e}"
                    ) from e
        cats = {c: pq.read_table(directory / "candidates" / f"{c}.parquet") for c in spec.candidates}
        return cls(spec, vocabs, cats)

    def catalogue_ids(self, ctype: str) -> pa.Array:
        """The catalogue's candidate ids (canonical text, see :func:`unirec.data.ids.normalise_ids`), in table order."""
        return self._cand_rows[ctype]

    def context(self, table: pa.Table, task_id: Optional[int] = None) -> Dict[str, pa.Array]:
        """``ctx.<field>`` and ``has.<field>`` for every unified context field (absent columns are missing),
        after the imputation rules of each row's task (``task_type`` column, else ``task_id``)."""
        table = self.impute(table, task_id)
        out: Dict[str, pa.Array] = {}
        n = table.num_rows
        for name, f in self.spec.context.items():
            col = table[name] if name in table.column_names else pa.nulls(n, _raw_type(f))
            values, present = self._encode(f, col, with_presence=True)
            out[f"ctx.{name}"], out[f"has.{name}"] = values, present
        return out

    def candidates(self, ctype: str, ids: pa.Array) -> Dict[str, pa.Array]:
        """``cand.<field>`` for candidates of one type, joined from the catalogue by id (text)."""
        cspec = self.spec.candidates[ctype]
        ids = normalise_ids(_as_array(ids))
        row = pc.fill_null(pc.add(pc.index_in(ids, value_set=self._cand_rows[ctype]), 1), 0)
        out = {f"cand.{cspec.id_field}": self._encode(self.spec.candidate_fields[cspec.id_field], ids)}
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
            cols.setdefault(f"cand.{f}", _sentinels(fspec, table.num_rows))
        return pa.table(cols)

    def _encode(self, f: FieldSpec, col, with_presence: bool = False):
        col = _as_array(col)
        kind = FieldKind(f.kind)
        if kind == FieldKind.dense:
            x = pc.cast(col, pa.float64())
            present = pc.fill_null(pc.is_finite(x), False)
            z = pc.divide(pc.subtract(x, f.mean), f.std)
            values = pc.cast(pc.if_else(present, z, 0.0), pa.float32())
        elif kind == FieldKind.tokens:
            tokens = tokenize(col)
            ids = self._lookup(f, pc.list_flatten(tokens))
            values = _pad(ids, pc.list_parent_indices(tokens).to_numpy(), len(col), f.max_len)
            present = pa.array(values.flatten().to_numpy().reshape(len(col), f.max_len)[:, 0] != SENTINEL)
        else:
            values = self._lookup(f, col)
            present = pc.not_equal(values, SENTINEL)
        if with_presence:
            return values, pc.cast(present, pa.uint8())
        return values

    def _lookup(self, f: FieldSpec, values: pa.Array) -> pa.Array:
        """Vocabulary (or hash bucket) index of each value: null -> SENTINEL, unseen -> OOV."""
        txt = pc.cast(values, pa.string())
        if f.hash_buckets:
            return _hash_index(txt, f.hash_buckets)
        idx = pc.index_in(txt, value_set=self._vocab[f.name])
        idx = pc.if_else(pc.is_null(idx), OOV, pc.add(idx, FIRST_ID))
        return pc.cast(pc.if_else(pc.is_null(txt), SENTINEL, idx), pa.int32())


def _hash_index(txt: pa.Array, buckets: int) -> pa.Array:
    """Stable hash bucket per value; hashes each distinct value once (crc32 of its UTF-8)."""
    enc = pc.dictionary_encode(txt)
    uniq = enc.dictionary.to_pylist()
    table = np.array([FIRST_ID + zlib.crc32(v.encode()) % buckets for v in uniq], dtype=np.int32)
    idx = enc.indices.to_numpy(zero_copy_only=False)
    valid = ~np.asarray(pc.is_null(txt), dtype=bool)
    out = np.full(len(txt), SENTINEL, dtype=np.int32)
    out[valid] = table[idx[valid].astype(np.int64)]
    return pa.array(out)


def _pad(ids: pa.Array, parents: np.ndarray, n: int, max_len: int) -> pa.FixedSizeListArray:
    """Ragged token ids (with their row index) -> fixed [n, max_len] bags padded with the sentinel."""
    ids_np = ids.to_numpy(zero_copy_only=False)
    first = np.searchsorted(parents, parents, side="left")
    pos = np.arange(len(parents)) - first
    keep = pos < max_len
    out = np.zeros((n, max_len), dtype=np.int32)
    out[parents[keep], pos[keep]] = ids_np[keep]
    return pa.FixedSizeListArray.from_arrays(pa.array(out.ravel()), max_len)


def _sentinels(f: FieldSpec, n: int) -> pa.Array:
    """A column of n sentinels (0) with the featurized type of field ``f``."""
    if f.kind == FieldKind.dense.value:
        return pa.array(np.zeros(n, np.float32))
    if f.kind == FieldKind.tokens.value:
        return pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * f.max_len, np.int32)), f.max_len)
    return pa.array(np.zeros(n, np.int32))


def _prepend_sentinel(arr: pa.Array) -> pa.Array:
    if isinstance(arr.type, pa.FixedSizeListType):
        size = arr.type.list_size
        flat = np.concatenate([np.zeros(size, np.int32), arr.flatten().to_numpy()])
        return pa.FixedSizeListArray.from_arrays(pa.array(flat), size)
    zero = np.zeros(1, dtype=arr.type.to_pandas_dtype())
    return pa.array(np.concatenate([zero, arr.to_numpy(zero_copy_only=False)]))


def _raw_type(f: FieldSpec) -> pa.DataType:
    return pa.float64() if f.kind == FieldKind.dense.value else pa.string()


def _as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _concat(arrays: Iterable) -> pa.Array:
    chunks = [c for a in arrays for c in (a.chunks if isinstance(a, pa.ChunkedArray) else [a])]
    return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string()).combine_chunks()


def save_vocabs(directory: Path, spec: FeatureSpec, vocabs: Mapping[str, list]) -> None:
    for f in [*spec.context.values(), *spec.candidate_fields.values()]:
        if f.vocab:
            path = Path(directory) / f.vocab
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(vocabs[f.name], ensure_ascii=False))
