"""The unified request context and the feature spec: the contract between data, model and serving.

The unified schema is derived from the selected tasks: the union of their context fields plus
``task_type``. A task that lacks a field gets the field's sentinel and a presence bit of 0.

Fields and tables are apart, as TorchRec separates features from embedding tables: every field that reads
ids names a table (its own name unless ``table:`` says otherwise), and fields that name one table share one
vocabulary and one embedding (the user's history and ``source_item`` read the candidate item id's table).
The index convention of every table is in :mod:`unirec.kinds`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

from unirec.config import CandidateConfig, FieldConfig, HistoryConfig, TaskConfig
from unirec.kinds import FIRST_ID, OOV, SENTINEL, kind_of

__all__ = ["FIRST_ID", "OOV", "SENTINEL"]  # re-exported: the index convention, see unirec.kinds
SPEC_VERSION = 2
# Columns every labeled example carries; a context field may not take one of these names.
RESERVED = frozenset(
    {"request_id", "timestamp", "candidate", "label", "weight", "task_type", "split", "event_order"}
)


class SchemaError(ValueError):
    """The task or candidate configuration cannot form one unified schema."""


@dataclass(frozen=True)
class TableSpec:
    """One embedding table once fitted: its rows and where its vocabulary is."""

    name: str
    size: int
    """Rows of the table (sentinel and OOV included)."""
    hash_buckets: int = 0
    vocab: Optional[str] = None
    """Vocabulary file relative to the feature directory (None for hashed tables)."""


@dataclass(frozen=True)
class FieldSpec:
    """One input field once fitted: what the featurizer and the model need (see :mod:`unirec.kinds`)."""

    name: str
    kind: str
    table: Optional[str] = None
    """The embedding table the field reads (None for kinds without one, e.g. dense)."""
    max_len: int = 1
    """Ids per row (token bags, sequences), else 1."""
    column: Optional[str] = None
    """Candidate table column (candidate fields only)."""
    mean: float = 0.0
    std: float = 1.0
    """Dense fields are standardised with the train mean and std."""


@dataclass(frozen=True)
class TaskSpec:
    """A task as the model and the service see it."""

    name: str
    id: int
    candidate: str
    fields: Tuple[str, ...]
    loss_weight: float = 1.0
    metrics: Tuple[str, ...] = ()
    impute: Dict[str, str] = field(default_factory=dict)
    """Imputation rules in force: missing context field -> source (see ``TaskConfig.impute``)."""


@dataclass(frozen=True)
class CandidateSpec:
    """A candidate entity type: its id field and feature fields."""

    name: str
    table: str
    key: str
    id_field: str
    fields: Tuple[str, ...]


@dataclass(frozen=True)
class FeatureSpec:
    """Everything derived from the data that the model and the featurizer need (``feature_spec.json``)."""

    context: Dict[str, FieldSpec]
    candidates: Dict[str, CandidateSpec]
    candidate_fields: Dict[str, FieldSpec]
    tasks: Dict[str, TaskSpec]
    tables: Dict[str, TableSpec] = field(default_factory=dict)
    version: int = SPEC_VERSION
    extras: Dict[str, object] = field(default_factory=dict)

    @property
    def num_task_types(self) -> int:
        return max(t.id for t in self.tasks.values()) + 1

    def table_of(self, field_name: str) -> TableSpec:
        """The table a context or candidate field reads."""
        f = self.context.get(field_name) or self.candidate_fields[field_name]
        return self.tables[f.table]

    def task_names_by_id(self) -> Dict[int, str]:
        return {t.id: t.name for t in self.tasks.values()}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> FeatureSpec:
        """Read ``feature_spec.json``; a missing, unknown or mistyped key is a SchemaError naming the file
        and the key (the spec may come from an artifact: it is input, not trusted code)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SchemaError(f"cannot read feature spec {path}: {e}") from e
        if not isinstance(raw, dict) or raw.get("version") != SPEC_VERSION:
            got = raw.get("version") if isinstance(raw, dict) else raw
            raise SchemaError(f"{path}: feature spec version {got!r}, expected {SPEC_VERSION}")
        _check_keys(raw, cls, "", path)
        groups = {"context": FieldSpec, "candidates": CandidateSpec, "candidate_fields": FieldSpec}
        groups.update(tasks=TaskSpec, tables=TableSpec)
        records = {
            g: {k: _record(kind, v, f"{g}.{k}", path) for k, v in raw[g].items()}
            for g, kind in groups.items()
        }
        return cls(**records, version=raw["version"], extras=raw.get("extras", {}))


def _record(kind: type, value: object, key: str, path: Path):
    """One spec record (a FieldSpec, TableSpec, ...) from its JSON object, checked key by key."""
    if not isinstance(value, dict):
        raise SchemaError(f"{path}: {key} is {type(value).__name__}, expected an object")
    _check_keys(value, kind, f"{key}.", path)
    if "name" in value and value["name"] != key.rpartition(".")[2]:
        raise SchemaError(f"{path}: {key}.name is {value['name']!r}; a record's name is its key")
    hints = typing.get_type_hints(kind)
    return kind(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in value.items()})


def _check_keys(value: Mapping, kind: type, prefix: str, path: Path) -> None:
    fields_ = {f.name: f for f in dataclasses.fields(kind)}
    required = [n for n, f in fields_.items() if f.default is MISSING and f.default_factory is MISSING]
    hints = typing.get_type_hints(kind)
    for k in value:
        if k not in fields_:
            raise SchemaError(
                f"{path}: {prefix}{k} is not a key of {kind.__name__}; known: {sorted(fields_)}"
            )
        if not _fits(hints[k], value[k]):
            raise SchemaError(f"{path}: {prefix}{k}={value[k]!r} is not a {hints[k]}")
    for k in required:
        if k not in value:
            raise SchemaError(f"{path}: {prefix}{k} is missing")


def _fits(hint, value) -> bool:
    """Whether a JSON value can stand for a spec field of this type (record types are checked apart)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        return any(_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, list) and all(_fits(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _fits(args[1], v) for k, v in value.items()
        )
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def unified_context(tasks: Mapping[str, TaskConfig]) -> Dict[str, FieldConfig]:
    """The union of the tasks' context fields, sorted by name; the same field must agree across tasks.

    >>> from unirec.config import TaskConfig, FieldConfig
    >>> a = TaskConfig(id=0, context={"user": FieldConfig("categorical")})
    >>> b = TaskConfig(id=1, context={"query": FieldConfig("tokens")})
    >>> list(unified_context({"a": a, "b": b}))
    ['query', 'user']
    """
    if not tasks:
        raise SchemaError("no task selected: choose at least one, e.g. task=[home,search]")
    merged: Dict[str, FieldConfig] = {}
    owner: Dict[str, str] = {}
    for name in sorted(tasks):
        for fname, fcfg in tasks[name].context.items():
            if fname in RESERVED:
                raise SchemaError(
                    f"task.{name}.context.{fname}: {sorted(RESERVED)} are column names of the labeled data; "
                    "rename the field"
                )
            if fname in merged and _field_key(merged[fname]) != _field_key(fcfg):
                raise SchemaError(
                    f"task.{name}.context.{fname} is declared as {_field_key(fcfg)} but task "
                    f"{owner[fname]} declares it as {_field_key(merged[fname])}; make them agree"
                )
            merged.setdefault(fname, fcfg)
            owner.setdefault(fname, name)
    return dict(sorted(merged.items()))


def validate_tasks(tasks: Mapping[str, TaskConfig], candidates: Mapping[str, CandidateConfig]) -> None:
    """Fail early, naming the key, on task ids, candidate types and field-name clashes."""
    ids: Dict[int, str] = {}
    for name, t in tasks.items():
        if not isinstance(t.id, int) or t.id < 0:
            raise SchemaError(f"task.{name}.id must be a non-negative integer, got {t.id!r}")
        if t.id in ids:
            raise SchemaError(
                f"task.{name}.id={t.id} is already used by task {ids[t.id]}; ids must be unique"
            )
        ids[t.id] = name
        if t.candidate not in candidates:
            raise SchemaError(
                f"task.{name}.candidate={t.candidate!r} is not a candidate type; known: {sorted(candidates)}"
            )
        for fname in t.context:
            if fname not in t.adapter.context:
                raise SchemaError(
                    f"task.{name}.adapter.context has no raw column for context field {fname!r}"
                )
        for fname in t.adapter.context:
            if fname not in t.context:
                raise SchemaError(
                    f"task.{name}.adapter.context.{fname} maps a field not in task.{name}.context"
                )
    ctx = unified_context(tasks)
    owner: Dict[str, str] = {}
    for cname, c in used_candidates(tasks, candidates).items():
        for fname in c.fields:
            if fname in ctx:
                raise SchemaError(f"data.candidates.{cname}.fields.{fname} clashes with a context field")
            if fname in owner:
                raise SchemaError(
                    f"data.candidates.{cname}.fields.{fname} is also a field of candidate type {owner[fname]}; "
                    "candidate field names must be unique across types"
                )
            owner[fname] = cname
        if not any(f.column == c.key for f in c.fields.values()):
            raise SchemaError(f"data.candidates.{cname}: no field reads the key column {c.key!r}")
    for name, t in tasks.items():
        for target, source in t.impute.items():
            _check_rule(f"task.{name}.impute.{target}", target, source, t, ctx, owner, candidates)


def _check_rule(key: str, target: str, source: str, task: TaskConfig, ctx, cand_owner, candidates) -> None:
    if target not in ctx:
        return  # no selected task has the field: the rule is inactive (see active_rules)
    if target in task.context:
        raise SchemaError(f"{key}: the task has {target!r} itself; rules fill only fields a task lacks")
    field_, _, cand = source.partition(".")
    if field_ not in task.context:
        raise SchemaError(
            f"{key}={source!r}: {field_!r} is not one of the task's context fields {sorted(task.context)}"
        )
    if cand and cand not in cand_owner:
        raise SchemaError(f"{key}={source!r}: {cand!r} is not a candidate field of the ranked types")
    src = candidates[cand_owner[cand]].fields[cand] if cand else task.context[field_]
    raw = [kind_of(f).raw_type for f in (ctx[target], src)]
    if raw[0] != raw[1]:
        raise SchemaError(
            f"{key}={source!r}: a {ctx[target].kind} field ({raw[0]}) cannot be filled from a {src.kind} "
            f"field ({raw[1]})"
        )


def with_history(
    tasks: Mapping[str, TaskConfig], history: HistoryConfig, candidates: Mapping[str, CandidateConfig]
) -> Dict[str, TaskConfig]:
    """The tasks with the history field (``data.history``) added to the context of every task that has its
    key; the field is joined in preparation, not mapped from a raw column. Unchanged when disabled, and when
    no selected task has the key (a single-task run of ``related``): the history is then inactive.

    The field shares the table of the candidate field that holds the history's ids (``history.table``)."""
    if not history.enabled:
        return dict(tasks)
    holders = {
        f: c
        for cand in candidates.values()
        for f, c in cand.fields.items()
        if table_name(f, c) == history.table
    }
    if not holders:
        raise SchemaError(
            f"data.history.table={history.table!r} is not the table of any candidate field; "
            "name the candidate id field whose ids the history holds (e.g. item)"
        )
    src = next(iter(holders.values()))
    fcfg = FieldConfig(
        kind="sequence",
        max_len=history.max_len,
        table=history.table,
        min_count=src.min_count,
        hash_buckets=src.hash_buckets,
    )
    out: Dict[str, TaskConfig] = {}
    for name, t in tasks.items():
        if history.field in t.context:
            raise SchemaError(
                f"task.{name}.context.{history.field} clashes with the history field; rename one "
                "(data.history.field)"
            )
        has_key = history.key in t.context
        out[name] = dataclasses.replace(t, context={**t.context, history.field: fcfg}) if has_key else t
    return out


def active_rules(task: TaskConfig, ctx: Mapping[str, FieldConfig]) -> Dict[str, str]:
    """A task's imputation rules whose target is in the unified context; a rule for a field that no
    selected task has (``query`` when search is left out) fills nothing and is dropped."""
    return {k: v for k, v in task.impute.items() if k in ctx}


def used_candidates(
    tasks: Mapping[str, TaskConfig], candidates: Mapping[str, CandidateConfig]
) -> Dict[str, CandidateConfig]:
    """The candidate types the selected tasks rank, in ``data.candidates`` order (others are left out of
    the prepared data and the model)."""
    used = {t.candidate for t in tasks.values()}
    return {c: cfg for c, cfg in candidates.items() if c in used}


def _field_key(f: FieldConfig) -> str:
    return (
        f"{f.kind}(min_count={f.min_count}, hash_buckets={f.hash_buckets}, max_len={f.max_len}, "
        f"table={f.table})"
    )


def table_name(name: str, cfg: FieldConfig) -> Optional[str]:
    """The table a field reads: ``cfg.table``, else its own name; None for kinds without a table."""
    return (cfg.table or name) if kind_of(cfg).has_table else None


def check_tables(fields: Mapping[str, FieldConfig]) -> None:
    """Fields that share a table must agree on how its vocabulary is built (min_count, hash_buckets)."""
    owner: Dict[str, Tuple[str, FieldConfig]] = {}
    for name, cfg in fields.items():
        t = table_name(name, cfg)
        if t is None:
            continue
        if t in owner:
            other, ocfg = owner[t]
            if (ocfg.min_count, ocfg.hash_buckets) != (cfg.min_count, cfg.hash_buckets):
                raise SchemaError(
                    f"fields {other!r} and {name!r} share table {t!r} but differ in min_count/hash_buckets "
                    f"({ocfg.min_count}/{ocfg.hash_buckets} against {cfg.min_count}/{cfg.hash_buckets}); "
                    "make them agree"
                )
        else:
            owner[t] = (name, cfg)
