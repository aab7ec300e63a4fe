"""The full protocol: every request's positives ranked against the whole catalogue of its candidate type.

A request excludes the items its user engaged with in the earlier splits when it has a user (a test
request: train and valid; a valid request: train; as the sequential protocol does, :func:`seen_items`).
Per task: ``ndcg@K``, ``recall@K`` and ``mrr``; ties count half (the expected rank under a random
tie-break). Scorers are :data:`MatrixScorer` s, so the model (:func:`model_matrix_scorer`), popularity
(:func:`popularity_matrix_scorer`) and the baselines of :mod:`unirec.baselines` rank exactly the same
requests with the same exclusions (:func:`full_ranking`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from unirec.data.batch import prefixed_tensors, presence
from unirec.data.features import Featurizer
from unirec.data.ids import normalise_ids
from unirec.data.prepare import popularity_counts
from unirec.metrics import Scores
from unirec.schema import FeatureSpec

HISTORY = "interactions.parquet"
"""Optional ``raw/`` file of a prepared data set: ``user_id, item_id, split`` of every interaction."""
# Scorers are called on chunks of at most this many (request, candidate) pairs. The model blocks its own
# work to stay in cache (unirec.model.ranker.BLOCK_PAIRS), so a chunk only bounds the score matrix and
# pays each call's overhead (featurizing the context rows, ranking) for about 150 requests of ML-100K.
_PAIRS_PER_CHUNK = 1 << 18


@dataclass
class Requests:
    """One task's requests of a split, for full ranking: one raw context row and the positives of each.

    ``positives[i]`` and ``exclude[i]`` are catalogue row numbers (the catalogue table's order).
    """

    context: pa.Table
    positives: List[np.ndarray]
    exclude: List[np.ndarray]
    unrankable: int
    """Positives that are not in the catalogue (they cannot be ranked, and are counted here)."""


# (task, raw context rows [R]) -> scores [R, C] over the task's whole catalogue
MatrixScorer = Callable[[str, pa.Table], torch.Tensor]


EARLIER = {"train": (), "valid": ("train",), "test": ("train", "valid")}
"""The splits whose engagements a request of each split excludes from its ranking."""


def seen_items(
    root: Path, catalogue: pa.Array, user_field: str = "user", split: str = "valid"
) -> Dict[str, np.ndarray]:
    """Raw user id -> catalogue rows of the items the user engaged with before ``split`` (:data:`EARLIER`).

    From ``root/raw/interactions.parquet`` when the data set has an interaction history (MovieLens: every
    rating, whatever canvas it went to, including the related canvas whose requests carry no user);
    otherwise from the positives of those splits of every task whose requests carry ``user_field``.
    """
    root = Path(root)
    earlier = pa.array(EARLIER[split], pa.string())
    if (root / "raw" / HISTORY).exists():
        t = pq.read_table(root / "raw" / HISTORY, columns=["user_id", "item_id", "split"])
        t = t.filter(pc.is_in(t["split"], value_set=earlier))
        users, items = t["user_id"], t["item_id"]
    else:
        parts = [labeled(root, s, None) for s in EARLIER[split] if (root / "labeled" / f"split={s}").is_dir()]
        if not parts or user_field not in parts[0].column_names:
            return {}
        t = pa.concat_tables([p.select(["label", "candidate", user_field]) for p in parts])
        t = t.filter(pc.and_(pc.greater(t["label"], 0), pc.is_valid(t[user_field])))
        users, items = t[user_field], t["candidate"]
    row = pc.index_in(normalise_ids(items), value_set=catalogue)
    keep = pc.is_valid(row)
    users = normalise_ids(users).filter(keep).to_numpy(zero_copy_only=False)
    row = row.filter(keep).to_numpy().astype(np.int64)
    order = np.argsort(users, kind="stable")
    users, row = users[order], row[order]
    bounds = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.r_[0, bounds]
    return {users[s]: np.unique(r) for s, r in zip(starts, np.split(row, bounds))}


def ranking_requests(
    root: Path,
    split: str,
    task: str,
    catalogue: pa.Array,
    seen: Dict[str, np.ndarray],
    user_field: str = "user",
) -> Requests:
    """The requests of ``task`` in ``split`` that have a positive, from the labeled data of a prepared set."""
    t = labeled(root, split, task)
    t = t.filter(pc.greater(t["label"], 0)).sort_by("request_id")
    rid = t["request_id"].to_numpy()
    first = np.r_[0, np.flatnonzero(rid[1:] != rid[:-1]) + 1] if len(rid) else np.zeros(0, np.int64)
    row = pc.index_in(normalise_ids(t["candidate"]), value_set=catalogue)
    known = np.asarray(pc.is_valid(row))
    rows = np.asarray(pc.fill_null(row, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
    positives = [r[k] for r, k in zip(np.split(rows, first[1:]), np.split(known, first[1:]))]
    context = t.take(pa.array(first))
    if user_field in context.column_names:
        users = normalise_ids(context[user_field]).to_pylist()
    else:
        users = [None] * len(first)
    empty = np.zeros(0, np.int64)
    exclude = [
        np.setdiff1d(seen.get(u, empty), p) if u is not None else empty for u, p in zip(users, positives)
    ]
    ok = np.array([len(p) > 0 for p in positives], dtype=bool)
    return Requests(
        context.filter(pa.array(ok)),
        [p for p, k in zip(positives, ok) if k],
        [e for e, k in zip(exclude, ok) if k],
        int((~known).sum()),
    )


def rank_metrics(
    scores: torch.Tensor, positives: Sequence[np.ndarray], exclude: Sequence[np.ndarray], k: int = 10
) -> Dict[str, np.ndarray]:
    """Per-request ``ndcg@k``, ``recall@k``, ``mrr`` and ``rank`` (of the best positive) of a score matrix.

    Args:
        scores: [R, C] scores of R requests over the whole catalogue.
        positives, exclude: per request, catalogue rows that are relevant / removed from the ranking.

    Each positive's rank is 1 + the number of kept items scoring higher + half of those scoring the same
    (other positives included), so a constant scorer gets the average rank, never the best.

    >>> s = torch.tensor([[0.9, 0.8, 0.7, 0.6]])
    >>> m = rank_metrics(s, [np.array([2])], [np.array([0])], k=1)
    >>> float(m["rank"][0]), float(m["recall@1"][0]), float(m["mrr"][0])
    (2.0, 0.0, 0.5)
    """
    s = scores.double().clone()
    r_ex = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    if len(r_ex):
        s[torch.from_numpy(r_ex), torch.from_numpy(np.concatenate(exclude))] = -math.inf
    n_pos = np.array([len(p) for p in positives])
    pr = torch.from_numpy(np.repeat(np.arange(len(positives)), n_pos))
    pc_ = torch.from_numpy(np.concatenate(positives).astype(np.int64)) if len(pr) else pr
    mine = s[pr, pc_].unsqueeze(1)
    rows = s[pr]
    rank = 1 + (rows > mine).sum(1).double() + ((rows == mine).sum(1).double() - 1) / 2
    rank = rank.numpy()
    pr = pr.numpy()
    hit = rank <= k
    dcg = np.bincount(pr, weights=hit / np.log2(rank + 1), minlength=len(positives))
    ideal = np.cumsum(1 / np.log2(np.arange(2, k + 2)))[np.minimum(n_pos, k) - 1]
    best = np.full(len(positives), np.inf)
    np.minimum.at(best, pr, rank)
    return {
        f"ndcg@{k}": dcg / ideal,
        f"recall@{k}": np.bincount(pr, weights=hit, minlength=len(positives)) / n_pos,
        "mrr": 1 / best,
        "rank": best,
    }


def full_ranking(
    scorers: Dict[str, MatrixScorer],
    root: Path,
    spec: FeatureSpec,
    split: str,
    catalogues: Dict[str, pa.Array],
    k: int = 10,
    user_field: str = "user",
    tasks: Optional[Sequence[str]] = None,
) -> Dict[str, Scores]:
    """Scorer name -> task -> full-ranking metrics (means over requests, plus ``requests`` and
    ``unrankable`` counts), for every task of ``spec`` or only ``tasks``. Every scorer ranks the same
    requests with the same exclusions."""
    seen = {c: seen_items(root, ids, user_field, split) for c, ids in catalogues.items()}
    out: Dict[str, Scores] = {name: {} for name in scorers}
    for task, t in spec.tasks.items():
        if tasks is not None and task not in tasks:
            continue
        req = ranking_requests(root, split, task, catalogues[t.candidate], seen[t.candidate], user_field)
        chunk = max(1, _PAIRS_PER_CHUNK // max(1, len(catalogues[t.candidate])))
        for name, score in scorers.items():
            if task not in getattr(score, "tasks", spec.tasks):  # a baseline that ranks some tasks only
                continue
            parts: Dict[str, List[np.ndarray]] = {}
            for a in range(0, req.context.num_rows, chunk):
                b = min(a + chunk, req.context.num_rows)
                m = rank_metrics(
                    score(task, req.context.slice(a, b - a)), req.positives[a:b], req.exclude[a:b], k
                )
                for key, v in m.items():
                    parts.setdefault(key, []).append(v)
            res = {key: float(np.concatenate(v).mean()) for key, v in parts.items() if key != "rank"}
            res.update(requests=req.context.num_rows, unrankable=req.unrankable)
            out[name][task] = res
    return out


def model_matrix_scorer(
    model, featurizer: Featurizer, catalogues: Dict[str, pa.Array], device=None, logits: bool = False
) -> MatrixScorer:
    """Scores of the model over each whole catalogue (encoded once), post-sigmoid like :func:`model_scorer`
    (``logits``: the logits themselves)."""
    device = device or torch.device("cpu")
    spec = featurizer.spec
    fields = {
        c: _on(prefixed_tensors(featurizer.candidates(c, ids), "cand."), device)
        for c, ids in catalogues.items()
    }
    with torch.inference_mode():
        vectors = {c: model.encode_candidates(f, c) for c, f in fields.items()}
    prior = getattr(model, "transitions", None)
    id_rows = {c: f.get(prior.id_field) if prior is not None else None for c, f in fields.items()}

    def score(task: str, context: pa.Table) -> torch.Tensor:
        feats = featurizer.context(context)
        ctx = _on(prefixed_tensors(feats, "ctx."), device)
        present = presence(feats, spec).to(device)
        task_type = torch.full((context.num_rows,), spec.tasks[task].id, dtype=torch.long, device=device)
        with torch.inference_mode():
            c, memory = model.encode_request(ctx, present, task_type)
            ctype = spec.tasks[task].candidate
            out = model.score_matrix(c, vectors[ctype], task_type, memory, id_rows[ctype]).double()
        return (out if logits else torch.sigmoid(out)).cpu()

    return score


def popularity_matrix_scorer(
    features: Path,
    featurizer: Featurizer,
    catalogues: Dict[str, pa.Array],
    seed: int = 0,
    pooled: bool = False,
) -> MatrixScorer:
    """Every request of a task gets the task's train engagement counts over the catalogue (tiny seeded
    jitter, as in :func:`popularity_scorer`); ``pooled``: the counts of every task that ranks the same
    candidate type, summed (popularity over all canvases)."""
    spec = featurizer.spec
    counts = popularity_counts(pq.read_table(Path(features) / "popularity.parquet"), spec)
    if pooled:
        by_type: Dict[str, np.ndarray] = {}
        for task, t in spec.tasks.items():
            by_type[t.candidate] = by_type.get(t.candidate, 0) + counts[task]
        counts = {task: by_type[t.candidate] for task, t in spec.tasks.items()}
    per_row = {}
    for task, t in spec.tasks.items():
        id_field = spec.candidates[t.candidate].id_field
        idx = featurizer.candidates(t.candidate, catalogues[t.candidate])[f"cand.{id_field}"].to_numpy()
        per_row[task] = counts[task][idx]
    rng = np.random.default_rng(seed)

    def score(task: str, context: pa.Table) -> torch.Tensor:
        base = per_row[task][None, :]
        return torch.from_numpy(base + rng.uniform(0, 1e-3, size=(context.num_rows, base.shape[1])))

    return score


def _on(tensors: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def labeled(root: Path, split: str, task: Optional[str]) -> pa.Table:
    """The labeled rows of ``split`` (one task's, or every task's with ``task=None``) of a prepared data set."""
    base = Path(root) / "labeled" / f"split={split}"
    pattern = f"task={task}/*.parquet" if task else "task=*/*.parquet"
    files = sorted(str(f) for f in base.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no labeled data for split {split!r}{f' task {task!r}' if task else ''} under {base}"
        )
    return ds.dataset(files, format="parquet").to_table()
