"""Artifact -> :class:`Scorer`: one request's context featurized and encoded once, N candidates scored in a batch.

Featurization is :class:`unirec.data.features.Featurizer`, the same code that wrote the training shards, and
the network is :class:`unirec.model.MultiTaskRanker` built from the artifact's ``feature_spec.json`` and
``model_config.json``; ``tests/serve/test_scorer.py`` checks the scores against the training-time forward.

Candidate features are static for one artifact, so :meth:`Scorer.warm_up` encodes the whole catalogue once
(``[C, H]``); a request then pays only for its context encoder and the tower over its N candidates. Ids that
are not in the catalogue are encoded per request, exactly as the featurizer sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from unirec.data.batch import column_tensor, prefixed_tensors
from unirec.data.features import Featurizer
from unirec.data.history import SNAPSHOT
from unirec.data.ids import normalise_ids
from unirec.data.prepare import popularity_counts
from unirec.export import (
    MODEL_CONFIG,
    POPULARITY,
    SPEC,
    WEIGHTS,
    ArtifactError,
    model_config_from_dict,
    read_json,
    verify,
)
from unirec.kinds import kind_of
from unirec.model import MultiTaskRanker
from unirec.schema import FeatureSpec

ContextValue = object  # str | int | float | None, as JSON gives it
# (field, value) featurizations remembered per scorer; beyond either bound the memo starts afresh. Values are
# length-limited by the request model, so the byte bound is what keeps a stream of unique values in check.
_MEMO_SIZE = 100_000
_MEMO_BYTES = 16 << 20


@dataclass(frozen=True)
class Encoded:
    """One request, encoded (:meth:`Scorer.encode`): its context as each candidate sees it, the candidates."""

    rows: torch.Tensor
    """[N, H] the request's context vector per candidate (broadcast, plus any target-aware attention)."""
    candidates: torch.Tensor
    """[N, H] the candidate vectors."""
    head: int
    """The index of the request's task head."""
    prior: Optional[torch.Tensor] = None
    """[N] the transition prior's term of the logits (model.transitions), None without one."""


@dataclass(frozen=True)
class Prepared:
    """One request featurized (:meth:`Scorer.prepare`), ready for :meth:`Scorer.encode_prepared`."""

    task: str
    context: Dict[str, torch.Tensor]
    """Context fields -> [1, ...]."""
    present: torch.Tensor
    """[1, Fc] presence."""
    task_type: torch.Tensor
    """[1] the task's id."""
    ids: Sequence
    """The candidate ids, as the request gave them."""
    rows: Optional[np.ndarray]
    """[N] each id's row in the warmed catalogue when every id is written as the catalogue writes it (the
    common case: no Arrow normalisation then), else None."""


class RequestError(ValueError):
    """A request the scorer cannot serve; ``field`` names the offending input (e.g. ``context.colour``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Artifact:
    """A verified artifact, loaded: nothing here came from unpickling or from a class named in a file."""

    path: Path
    version: str
    manifest: Dict
    spec: FeatureSpec
    featurizer: Featurizer
    model: MultiTaskRanker
    popularity: pa.Table
    catalogues: Dict[str, pa.Array]
    """Candidate type -> its catalogue ids as text, in table order (the featurizer's join key)."""
    histories: Dict[str, Tuple[str, ...]]
    """The history snapshot exported with the artifact: user (canonical text) -> ids, oldest first."""


def load_artifact(path: Path) -> Artifact:
    """Verify every file of the artifact (hashes, manifest, suffixes), then load it as plain data."""
    path = Path(path)
    manifest = verify(path)
    spec = FeatureSpec.load(path / SPEC)
    cfg = model_config_from_dict(read_json(path / MODEL_CONFIG), f"{path / MODEL_CONFIG}")
    model = MultiTaskRanker(spec, cfg)
    try:
        model.load_state_dict(load_file(str(path / WEIGHTS)))
    except (SafetensorError, RuntimeError, ValueError, OSError) as e:
        raise ArtifactError(f"{path / WEIGHTS} cannot be loaded into the model: {e}") from e
    model.eval()
    featurizer = Featurizer.load(path)
    popularity = pq.read_table(path / POPULARITY)
    catalogues = {c: featurizer.catalogue_ids(c) for c in spec.candidates}
    histories = _read_snapshot(path / SNAPSHOT) if (path / SNAPSHOT).exists() else {}
    return Artifact(
        path, manifest["version"], manifest, spec, featurizer, model, popularity, catalogues, histories
    )


def _read_snapshot(path: Path) -> Dict[str, Tuple[str, ...]]:
    t = pq.read_table(path, columns=["user", "history"])
    users = normalise_ids(t["user"]).to_pylist()
    return {u: tuple(h) for u, h in zip(users, t["history"].to_pylist()) if u is not None}


class Scorer:
    """Scores candidates for a request of any task of one artifact; thread-safe (read-only after warm-up).

    Args:
        artifact: a loaded artifact (:func:`load_artifact`).

    Shapes: one request; N candidates; H hidden width. ``score`` -> [N] post-sigmoid scores (float64).
    """

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.spec = artifact.spec
        self.model = artifact.model
        self._fields = list(self.spec.context)
        self._catalogue: Dict[str, pa.Array] = {}
        self._vectors: Dict[str, torch.Tensor] = {}
        self._row_of: Dict[str, Dict[str, int]] = {}
        self._id_rows: Dict[str, torch.Tensor] = {}
        """Candidate type -> [C] the id table row of each catalogue row (for the transition prior)."""
        self._popular: Dict[str, Tuple[list, np.ndarray]] = {}
        self._memo: Dict[Tuple[str, object], Tuple[np.ndarray, float]] = {}
        self._memo_bytes = 0
        # (task, values of the rules' source fields) -> imputed values: Arrow once per distinct source.
        self._impute_memo: Dict[Tuple, Dict[str, object]] = {}
        counts = popularity_counts(artifact.popularity, self.spec)
        for task, t in self.spec.tasks.items():
            self._popular[task] = self._popularity_order(counts[task], t.candidate)

    @classmethod
    def load(cls, path: Path, warm: bool = True) -> Scorer:
        scorer = cls(load_artifact(path))
        if warm:
            scorer.warm_up()
        return scorer

    @property
    def version(self) -> str:
        return self.artifact.version

    def warm_up(self) -> None:
        """Encode every catalogue candidate once and score one request per task; refuse non-finite output."""
        with torch.inference_mode():
            for ctype in self.spec.candidates:
                ids = self.artifact.catalogues[ctype]
                self._catalogue[ctype] = ids
                # Catalogue ids are canonical text, which normalisation leaves as it is: an id written
                # exactly so is that row, and anything else takes the Arrow path.
                self._row_of[ctype] = {t: i for i, t in enumerate(ids.to_pylist()) if t is not None}
                fields = self._candidate_tensors(ctype, ids)
                self._vectors[ctype] = self.model.encode_candidates(fields, ctype)
                if self.model.transitions is not None and self.model.transitions.id_field in fields:
                    self._id_rows[ctype] = fields[self.model.transitions.id_field]
        for task, t in self.spec.tasks.items():
            ids = self._catalogue[t.candidate].slice(0, 8).to_pylist()
            scores = self.score(task, {}, ids)
            if not np.isfinite(scores).all():
                raise ArtifactError(f"{self.artifact.path}: warm-up scores of task {task!r} are not finite")

    def with_history(self, task: str, context: Mapping[str, ContextValue], mode: str) -> Dict:
        """The request's context with its history resolved by an environment's ``history`` knob: ``request``
        (as sent), ``snapshot`` (the artifact's history of the request's user) or ``merge`` (the snapshot,
        then the request's own ids as the most recent)."""
        hist = self.spec.extras.get("history")
        context = dict(context)
        if mode == "request" or not hist or hist["field"] not in self.spec.tasks[task].fields:
            return context
        snap = self._snapshot_of(context.get(hist["key"]))
        sent = tuple(context.get(hist["field"]) or ())
        context[hist["field"]] = list(snap) if mode == "snapshot" else [*snap, *sent]
        return context

    def _snapshot_of(self, user: ContextValue) -> Tuple[str, ...]:
        if user is None:
            return ()
        found = self.artifact.histories.get(str(user))
        if found is None:  # not in canonical spelling ("007"): the one normalisation, then a second look
            found = self.artifact.histories.get(normalise_ids(pa.array([str(user)]))[0].as_py())
        return found or ()

    def check_context(self, task: str, context: Mapping[str, ContextValue]) -> Tuple[Dict, list]:
        """(fields the task uses, fields it ignores); an unknown field or task raises RequestError naming it.

        A field of the unified schema that the task does not have stays at its sentinel, as in training:
        the model never saw that field present for this task.
        """
        if task not in self.spec.tasks:
            raise RequestError("task", f"unknown task {task!r}; known: {sorted(self.spec.tasks)}")
        for name in context:
            if name not in self.spec.context:
                raise RequestError(
                    f"context.{name}", f"not a field of the unified schema; known: {self._fields}"
                )
        own = set(self.spec.tasks[task].fields)
        used = {k: v for k, v in context.items() if k in own and v is not None}
        return used, sorted(k for k in context if k not in own)

    def context_tensors(self, task: str, context: Mapping[str, ContextValue]):
        """Featurize one request's context: (fields -> [1, ...], presence [1, Fc], task_type [1]).

        Each (field, value) is featurized by the Featurizer once and remembered (a bounded memo): the
        featurizer's Arrow kernels cost about 2 ms per call on one row, a dictionary hit a microsecond, and
        a field's encoding depends on nothing but its own value.
        """
        used, _ = self.check_context(task, context)
        if self.artifact.featurizer.impute:
            used = self._imputed(task, used)
        values = {f: self._normalise(f, used.get(f)) for f in self._fields}
        # Rows are taken from the memo once, and the missing ones from their fresh featurization: a memo
        # cleared meanwhile (by this request or another thread) cannot take a row this request needs.
        rows = {f: self._memo.get((f, v)) for f, v in values.items()}
        missing = {f: values[f] for f, r in rows.items() if r is None}
        if missing:
            rows.update(self._featurize_into_memo(missing))
        ctx = {f: torch.from_numpy(rows[f][0])[None] for f in self._fields}
        present = torch.tensor([[rows[f][1] for f in self._fields]], dtype=torch.float32)
        return ctx, present, torch.tensor([self.spec.tasks[task].id])

    def _imputed(self, task: str, used: Dict[str, ContextValue]) -> Dict[str, ContextValue]:
        """The task's imputation rules applied to one request, as the Featurizer applies them in training."""
        rules = self.spec.tasks[task].impute
        if not rules:
            return used
        sources = sorted({r.partition(".")[0] for r in rules.values()})
        key = (task, tuple(None if used.get(f) is None else str(used[f]) for f in sources))
        filled = self._impute_memo.get(key)
        if filled is None:
            cols = {f: pa.array([v], pa.string()) for f, v in zip(sources, key[1])}
            table = self.artifact.featurizer.impute(pa.table(cols), self.spec.tasks[task].id)
            filled = {t: table[t][0].as_py() for t in rules if t in table.column_names}
            if len(self._impute_memo) > _MEMO_SIZE // 10:
                self._impute_memo.clear()  # bounded, like the featurization memo
            self._impute_memo[key] = filled
        return {**used, **{t: v for t, v in filled.items() if v is not None}}

    def _normalise(self, field: str, value: ContextValue):
        if value is None:
            return None
        f = self.spec.context[field]
        try:
            return kind_of(f).request_value(value)
        except (TypeError, ValueError) as e:
            raise RequestError(f"context.{field}", f"expected a {f.kind} value, got {value!r}") from e

    def _featurize_into_memo(self, values: Dict[str, object]) -> Dict[str, Tuple[np.ndarray, float]]:
        """Featurize (field -> value) in one Featurizer call; remember and return field -> (row, presence)."""
        cols = {f: pa.array([v], kind_of(self.spec.context[f]).raw_type) for f, v in values.items()}
        feats = self.artifact.featurizer.context(pa.table(cols))
        if len(self._memo) > _MEMO_SIZE or self._memo_bytes > _MEMO_BYTES:
            self._memo.clear()  # crude but bounded; the working set refills in a few requests
            self._memo_bytes = 0
        fresh = {}
        for f, v in values.items():
            row = np.array(column_tensor(feats[f"ctx.{f}"])[0].numpy())
            fresh[f] = self._memo[(f, v)] = (row, float(feats[f"has.{f}"][0].as_py()))
            self._memo_bytes += _approx_bytes(v) + row.nbytes + 200  # + the dict entry and tuple
        return fresh

    def score(self, task: str, context: Mapping[str, ContextValue], ids: Sequence[str]) -> np.ndarray:
        """Post-sigmoid scores [N] of ``ids`` (candidates of the task's type) for this request."""
        return self.score_encoded([self.encode(task, context, ids)])[0]

    def encode(self, task: str, context: Mapping[str, ContextValue], ids: Sequence[str]) -> Encoded:
        """One request featurized and encoded, ready for :meth:`score_encoded`; RequestError names bad input."""
        return self.encode_prepared([self.prepare(task, context, ids)])[0]

    def prepare(self, task: str, context: Mapping[str, ContextValue], ids: Sequence[str]) -> Prepared:
        """One request featurized (its context from the memo, its ids' catalogue rows), not yet encoded; the step
        that can fail on a request's own input (RequestError names it)."""
        ctx, present, task_type = self.context_tensors(task, context)
        rows = self._catalogue_rows(self.spec.tasks[task].candidate, ids)
        return Prepared(task, ctx, present, task_type, ids, rows)

    def _catalogue_rows(self, ctype: str, ids: Sequence) -> Optional[np.ndarray]:
        """[N] the catalogue row of each id, or None unless every id is one as the catalogue writes it."""
        row_of = self._row_of.get(ctype)
        if row_of is None:
            return None
        try:
            return np.fromiter(map(row_of.__getitem__, ids), np.int64, len(ids))  # no generator frame per id
        except (KeyError, TypeError):  # an unknown, non-canonical or non-text id
            return None

    def encode_prepared(self, requests: Sequence[Prepared]) -> List[Encoded]:
        """Prepared requests encoded, in order: the context encoder runs once over every request's context
        and the candidate vectors are looked up once for every request's ids (micro-batching encodes its
        batch so; a request's own rows still see only its own context and candidates)."""
        out: List[Encoded] = [None] * len(requests)  # type: ignore[list-item]
        groups: Dict[tuple, List[int]] = {}
        for i, r in enumerate(requests):  # one pass per task and context shape (a history's length)
            groups.setdefault((r.task, tuple(t.shape for t in r.context.values())), []).append(i)
        with torch.inference_mode():
            for (task, _), members in groups.items():
                part = [requests[i] for i in members]
                ctx = {f: _cat([r.context[f] for r in part]) for f in part[0].context}
                task_type = _cat([r.task_type for r in part])
                c, memory = self.model.encode_request(ctx, _cat([r.present for r in part]), task_type)
                ctype = self.spec.tasks[task].candidate
                v = self._part_vectors(ctype, part)
                heads = self.model.head_index(task_type[:1])
                head = int(heads[0])
                ids = self._part_ids(ctype, part, heads)
                start = 0
                for k, (i, r) in enumerate(zip(members, part)):
                    end = start + len(r.ids)
                    vi = v[start:end]
                    mem = {n: tuple(t[k : k + 1] for t in m) for n, m in memory.items()}
                    prior = None
                    if ids is not None:
                        prior = self.model.prior_logits(mem, ids[start:end], heads)[0]
                    out[i] = Encoded(self.model.request_rows(c[k : k + 1], vi, mem), vi, head, prior)
                    start = end
        return out

    def score_encoded(self, requests: Sequence[Encoded]) -> List[np.ndarray]:
        """Post-sigmoid scores of encoded requests, all rows in one pass of the tower and the requests' own
        heads (micro-batching merges concurrent requests of one task so); [N_i] per request, in order."""
        sizes = [len(r.candidates) for r in requests]
        with torch.inference_mode():
            rows = _cat([r.rows for r in requests])
            v = _cat([r.candidates for r in requests])
            head = _cat([torch.full((n,), r.head) for n, r in zip(sizes, requests)])
            logits = self.model.head_logits(rows, v, head)
            if any(r.prior is not None for r in requests):
                logits = logits + _cat(
                    [torch.zeros(n) if r.prior is None else r.prior for n, r in zip(sizes, requests)]
                )
        scores = torch.sigmoid(logits.double()).numpy()
        return np.split(scores, np.cumsum(sizes[:-1]))

    def popular(self, task: str, limit: int) -> list:
        """The task's most engaged candidate ids in train, most first."""
        return self._popular[task][0][:limit]

    def popularity(self, task: str, ids: Sequence[str]) -> np.ndarray:
        """Each id's share of the task's train engagements (0 for ids never engaged with)."""
        order, share = self._popular[task]
        rank = {i: s for i, s in zip(order, share)}
        return np.array([rank.get(str(i), 0.0) for i in ids], dtype=np.float64)

    def _part_vectors(self, ctype: str, part: Sequence[Prepared]) -> torch.Tensor:
        """[sum N_i, H] the candidate vectors of several requests' ids, in order."""
        rows = _part_rows(part)
        if rows is not None:
            return self._vectors[ctype][rows]
        ids = pa.array([str(i) for r in part for i in r.ids], pa.string())
        return self._candidate_vectors(ctype, ids)

    def _part_ids(self, ctype: str, part: Sequence[Prepared], head: torch.Tensor) -> Optional[torch.Tensor]:
        """[sum N_i] the id table rows of several requests' ids, in order; None unless the model's
        transition prior scores the task (``head`` [1])."""
        prior = self.model.transitions
        if prior is None or not bool(prior.uses[head].any()):
            return None
        rows = _part_rows(part)
        if ctype in self._id_rows and rows is not None:
            return self._id_rows[ctype][rows]
        ids = pa.array([str(i) for r in part for i in r.ids], pa.string())
        return self._candidate_tensors(ctype, ids)[prior.id_field]

    def _candidate_vectors(self, ctype: str, ids: pa.Array) -> torch.Tensor:
        if ctype not in self._vectors:
            return self.model.encode_candidates(self._candidate_tensors(ctype, ids), ctype)
        row = pc.index_in(normalise_ids(ids), value_set=self._catalogue[ctype])
        if row.null_count == 0:
            return self._vectors[ctype][torch.from_numpy(row.to_numpy().astype(np.int64))]
        known = np.asarray(pc.is_valid(row))
        out = torch.empty(len(ids), self._vectors[ctype].shape[1])
        out[torch.from_numpy(known)] = self._vectors[ctype][
            torch.from_numpy(row.drop_null().to_numpy().astype(np.int64))
        ]
        unknown = ids.filter(pa.array(~known))
        out[torch.from_numpy(~known)] = self.model.encode_candidates(
            self._candidate_tensors(ctype, unknown), ctype
        )
        return out

    def _candidate_tensors(self, ctype: str, ids: pa.Array) -> Dict[str, torch.Tensor]:
        return prefixed_tensors(self.artifact.featurizer.candidates(ctype, ids), "cand.")

    def _popularity_order(self, counts: np.ndarray, ctype: str) -> Tuple[list, np.ndarray]:
        """Candidate ids with train engagements, most first, and their shares (``counts`` per id index)."""
        id_field = self.spec.candidates[ctype].id_field
        ids = self.artifact.catalogues[ctype]
        idx = self.artifact.featurizer.candidates(ctype, ids)[f"cand.{id_field}"].to_numpy()
        per_id = counts[idx]
        order = np.argsort(-per_id, kind="stable")
        order = order[per_id[order] > 0]
        total = per_id.sum() or 1.0
        return [ids[i].as_py() for i in order], per_id[order] / total


def _part_rows(part: Sequence[Prepared]) -> Optional[torch.Tensor]:
    """[sum N_i] the catalogue rows of several requests' ids, in order; None unless every id has one."""
    if not all(r.rows is not None for r in part):
        return None
    return torch.from_numpy(part[0].rows if len(part) == 1 else np.concatenate([r.rows for r in part]))


def _cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    """One request's tensor as it is (no copy), several concatenated."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _approx_bytes(value) -> int:
    """Rough size of a memo key's value (text, number, or a tuple of ids)."""
    if isinstance(value, tuple):
        return sum(len(v) for v in value) + 8 * len(value)
    return len(str(value)) if value is not None else 0
