"""Offline evaluation: the model and the popularity baseline scored with the same per-task metric code.

Two protocols, each per task:

- **sampled** (:func:`evaluate`): the split's logged candidates of every request are ranked: for MovieLens
  the positive plus 100 sampled items the user never interacted with (the NCF-style protocol; with one
  positive per request ``recall@10`` is HR@10), for the synthetic canvases the logged impressions. Training
  validates with this protocol.
- **full** (:func:`full_ranking`): every request's positives are ranked against the whole catalogue of its
  candidate type, minus the items the user engaged with in the earlier splits when the request has a user
  (a test request: train and valid; a valid request: train; as the sequential protocol does,
  :func:`seen_items`):
  ``ndcg@K``, ``recall@K`` and ``mrr``. Ties count half (the expected rank under a random tie-break).

``python -m unirec.evaluate RUN_OR_ARTIFACT`` runs both on a training run's checkpoint or an exported
artifact, for any split, and writes JSON (see :func:`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from unirec.data.batch import Batch, prefixed_tensors, presence
from unirec.data.features import Featurizer
from unirec.data.ids import normalise_ids
from unirec.data.loader import eval_batches
from unirec.data.prepare import popularity_counts
from unirec.kinds import kind_of
from unirec.metrics import TaskMetrics
from unirec.schema import FeatureSpec

Scores = Dict[str, Dict[str, float]]


def evaluate(
    score: Callable[[Batch], torch.Tensor],
    features: Path,
    spec: FeatureSpec,
    split: str,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
) -> Scores:
    """Per-task metrics of ``score`` (batch -> [B] scores) over every row of ``split``.

    Under torchrun each rank scores its share of the rows; torchmetrics gathers the states of every rank
    before computing, so every rank returns the metrics of the whole split.
    """
    metrics = TaskMetrics({t: s.metrics for t, s in spec.tasks.items()})
    for task in spec.tasks:
        for batch in eval_batches(features, spec, split, task, batch_size, rank, world):
            metrics.update(task, score(batch), batch.label, batch.request_id)
    return metrics.compute()


def model_scorer(
    model: torch.nn.Module, device: torch.device, autocast: bool
) -> Callable[[Batch], torch.Tensor]:
    """Batch -> logits on ``device`` under inference mode (and bf16 autocast when asked)."""

    def score(batch: Batch) -> torch.Tensor:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            # Post-sigmoid scores: torchmetrics' ranking metrics treat a score <= 0 as "not retrieved",
            # which would zero out negative logits; the sigmoid keeps every request's order.
            # Each request's context is encoded once for its rows (as serving does).
            b = batch.to(device)
            logits = model.request_logits(b) if hasattr(model, "request_logits") else model(b)
            return torch.sigmoid(logits.double()).cpu()

    return score


def popularity_scorer(features: Path, spec: FeatureSpec, seed: int = 0) -> Callable[[Batch], torch.Tensor]:
    """Batch -> train engagement count of each candidate within its task (a tiny seeded jitter breaks ties,
    so shard order can never leak into the ranking)."""
    counts = popularity_counts(pq.read_table(Path(features) / "popularity.parquet"), spec)
    # task_type id -> (candidate id field, engagement count per id index), built once
    tables = {t.id: (spec.candidates[t.candidate].id_field, counts[task]) for task, t in spec.tasks.items()}
    rng = np.random.default_rng(seed)

    def score(batch: Batch) -> torch.Tensor:
        tt = batch.task_type.numpy()
        out = np.empty(len(tt), dtype=np.float64)
        for type_id, (id_field, counts) in tables.items():
            rows = tt == type_id
            out[rows] = counts[batch.candidate[id_field].numpy()[rows]]
        return torch.from_numpy(out + rng.uniform(0, 1e-3, size=len(out)))

    return score


# ---------------------------------------------------------------------------------------------------------
# Full-catalogue ranking

HISTORY = "interactions.parquet"
"""Optional ``raw/`` file of a prepared data set: ``user_id, item_id, split`` of every interaction."""
# Score matrices are built in chunks of at most this many (request, candidate) pairs: small enough that
# the tower's activations stay in cache (4096 pairs ran 1.6x faster than 65536 on ML-100K).
_PAIRS_PER_CHUNK = 1 << 12


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
        parts = [
            _labeled(root, s, None) for s in EARLIER[split] if (root / "labeled" / f"split={s}").is_dir()
        ]
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
    t = _labeled(root, split, task)
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
) -> Dict[str, Scores]:
    """Scorer name -> task -> full-ranking metrics (means over requests, plus ``requests`` and
    ``unrankable`` counts). Every scorer ranks the same requests with the same exclusions."""
    seen = {c: seen_items(root, ids, user_field, split) for c, ids in catalogues.items()}
    out: Dict[str, Scores] = {name: {} for name in scorers}
    for task, t in spec.tasks.items():
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


def baseline_digest(
    features: Path, featurizer: Featurizer, catalogues, split: str, k: int = 10, seed: int = 0
) -> str:
    """A digest of everything the baselines' full-ranking figures on ``split`` depend on: each catalogue,
    the pooled train counts over it, the interactions and requests (users, histories, positives, exclusions)
    of the valid split (BPR-MF's and the transitions' choice) and of ``split``, ``k`` and ``seed``. Two data
    sets with the same digest get the same baseline figures, so they are computed once (MovieLens: the seed
    draws which canvas an event goes to, not what the pooled baselines see)."""
    import hashlib

    spec, root = featurizer.spec, Path(features).parent
    h = hashlib.sha256(f"{split} k={k} seed={seed}".encode())
    counts = popularity_counts(pq.read_table(Path(features) / "popularity.parquet"), spec)
    for ctype, ids in sorted(catalogues.items()):
        tasks = sorted(t for t, ts in spec.tasks.items() if ts.candidate == ctype)
        h.update(f"\n{ctype} {tasks}\n".encode() + "\t".join(ids.to_pylist()).encode())
        idx = featurizer.candidates(ctype, ids)[f"cand.{spec.candidates[ctype].id_field}"].to_numpy()
        h.update(np.asarray(sum(counts[t] for t in tasks)[idx], dtype=np.float64).tobytes())
        for s in dict.fromkeys(("valid", split)):
            seen = seen_items(root, ids, "user", s)
            for u in sorted(seen):
                h.update(f"{u}:".encode() + seen[u].tobytes())
            for t in tasks:
                req = ranking_requests(root, s, t, ids, seen)
                users = req.context["user"].to_pylist() if "user" in req.context.column_names else []
                h.update(f"{s} {t} {users} {req.unrankable}".encode())
                for f in (f for f in spec.tasks[t].fields if kind_of(spec.context[f]).ordered):  # histories
                    h.update(f"{f} {req.context[f].to_pylist()}".encode())
                for p, x in zip(req.positives, req.exclude):
                    h.update(p.tobytes() + b"|" + x.tobytes())
    return h.hexdigest()[:20]


def baseline_scorers(features: Path, featurizer: Featurizer, catalogues, seed: int = 0) -> Dict:
    """``popularity_all``, ``bpr_mf`` (when some task's requests carry a user) and ``transitions`` (when some
    task's context has a history), :mod:`unirec.baselines`."""
    from unirec.baselines import BPRConfig, fit_bpr, fit_transitions

    out = {"popularity_all": popularity_matrix_scorer(features, featurizer, catalogues, seed, pooled=True)}
    fitted = {
        "bpr_mf": fit_bpr(Path(features).parent, featurizer, catalogues, BPRConfig(seed=seed)),
        "transitions": fit_transitions(Path(features).parent, featurizer, catalogues),
    }
    out.update({name: scorer for name, scorer in fitted.items() if scorer is not None})
    return out


def _on(tensors: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in tensors.items()}


def _labeled(root: Path, split: str, task: Optional[str]) -> pa.Table:
    base = Path(root) / "labeled" / f"split={split}"
    pattern = f"task={task}/*.parquet" if task else "task=*/*.parquet"
    files = sorted(str(f) for f in base.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no labeled data for split {split!r}{f' task {task!r}' if task else ''} under {base}"
        )
    return ds.dataset(files, format="parquet").to_table()


# ---------------------------------------------------------------------------------------------------------
# python -m unirec.evaluate


@dataclass
class Loaded:
    """A trained model with what evaluating it needs."""

    model: torch.nn.Module
    featurizer: Featurizer
    features: Path
    checkpoint: str


def load(source: Path, checkpoint: str = "best", data: Optional[Path] = None) -> Loaded:
    """A training run directory (its checkpoint ``checkpoint``) or an exported artifact (``manifest.json``),
    with the features directory it was trained on (``data`` overrides it: a prepared ``.../features``)."""
    from safetensors.torch import load_file

    from unirec.export import (
        METRICS,
        SPEC,
        WEIGHTS,
        ArtifactError,
        checkpoint_dir,
        model_config_from_run,
        read_json,
    )
    from unirec.model import MultiTaskRanker

    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is neither a training run directory nor an exported artifact")
    meta = read_json(source / METRICS) if (source / METRICS).exists() else {}
    features = Path(data) if data else Path(meta["features"]) if "features" in meta else None
    if features is None:
        raise ValueError(f"{source / METRICS} does not name the features directory; pass --data")
    if not (features / SPEC).exists():
        raise FileNotFoundError(f"{features / SPEC} is missing: --data must be a prepared features directory")
    if (source / "manifest.json").exists():
        from unirec.serve.scorer import load_artifact

        art = load_artifact(source)
        if art.spec != FeatureSpec.load(features / SPEC):
            raise ArtifactError(f"{source} was not trained on {features}: their feature_spec.json differ")
        return Loaded(art.model, art.featurizer, features, f"artifact {art.version}")
    ckpt = checkpoint_dir(source, checkpoint)
    featurizer = Featurizer.load(features)
    model = MultiTaskRanker(featurizer.spec, model_config_from_run(source))
    model.load_state_dict(load_file(str(ckpt / WEIGHTS)))
    return Loaded(model.eval(), featurizer, features, ckpt.name)


def run(
    source: Path,
    split: str = "test",
    protocols: Sequence[str] = ("full", "sampled"),
    checkpoint: str = "best",
    data: Optional[Path] = None,
    k: int = 10,
    batch_size: int = 8192,
    seed: int = 0,
    popularity: bool = True,
    baselines: bool = False,
    baseline_cache: Optional[Path] = None,
) -> Dict:
    """Both protocols for the model (and the popularity baseline) on ``split``; a JSON-ready dict.
    ``baselines``: also pooled popularity and BPR-MF in the full protocol (:mod:`unirec.baselines`);
    ``baseline_cache``: a directory where their figures are kept under :func:`baseline_digest`, and taken
    from when the digest is there."""
    loaded = load(source, checkpoint, data)
    spec, feats = loaded.featurizer.spec, loaded.features
    out: Dict = {"source": str(source), "checkpoint": loaded.checkpoint, "features": str(feats),
                 "split": split, "k": k, "protocols": {}, "seconds": {}}  # fmt: skip
    for protocol in protocols:
        t0 = time.perf_counter()
        if protocol == "full":
            cats = {c: loaded.featurizer.catalogue_ids(c) for c in spec.candidates}
            scorers = {"model": model_matrix_scorer(loaded.model, loaded.featurizer, cats)}
            if popularity:
                scorers["popularity"] = popularity_matrix_scorer(feats, loaded.featurizer, cats, seed)
            full = full_ranking(scorers, feats.parent, spec, split, cats, k)
            if baselines:
                full.update(_baselines(feats, loaded.featurizer, cats, split, k, seed, baseline_cache, out))
            out["protocols"]["full"] = full
            out.setdefault("baselines", {})  # the baselines' chosen settings (set by _baselines)
        elif protocol == "sampled":
            res = {
                "model": evaluate(
                    model_scorer(loaded.model, torch.device("cpu"), False), feats, spec, split, batch_size
                )
            }
            if popularity:
                res["popularity"] = evaluate(
                    popularity_scorer(feats, spec, seed), feats, spec, split, batch_size
                )
            out["protocols"]["sampled"] = res
        else:
            raise ValueError(f"unknown protocol {protocol!r}: use full or sampled")
        out["seconds"][protocol] = round(time.perf_counter() - t0, 2)
    return out


def _baselines(feats, featurizer, cats, split, k, seed, cache: Optional[Path], out: Dict) -> Dict:
    """The baselines' full-ranking figures (and, into ``out["baselines"]``, their chosen settings), from
    ``cache`` when it holds this data's :func:`baseline_digest`."""
    path = None
    if cache is not None:
        path = Path(cache) / f"baselines-{baseline_digest(feats, featurizer, cats, split, k, seed)}.json"
        if path.exists():
            kept = json.loads(path.read_text())
            out["baselines"] = kept["chosen"]
            out["baselines_from"] = str(path)
            return kept["figures"]
    scorers = baseline_scorers(feats, featurizer, cats, seed)
    figures = full_ranking(scorers, feats.parent, featurizer.spec, split, cats, k)
    out["baselines"] = {n: s.chosen for n, s in scorers.items() if getattr(s, "chosen", None)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes of one report may write it at once
        tmp.write_text(json.dumps({"chosen": out["baselines"], "figures": figures}, indent=2, sort_keys=True))
        tmp.replace(path)
    return figures


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """``python -m unirec.evaluate RUN_OR_ARTIFACT [--split test] [--protocol full sampled] [--out FILE]``."""
    from unirec.report import format_table

    ap = argparse.ArgumentParser(prog="python -m unirec.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="training run directory or exported artifact (vNNNNNN)")
    ap.add_argument(
        "--checkpoint", default="best", help="of a run: best (default), best:<task>, latest or step-N"
    )
    ap.add_argument("--split", default="test", choices=("train", "valid", "test"))
    ap.add_argument("--protocol", nargs="+", default=["full", "sampled"], choices=("full", "sampled"))
    ap.add_argument("--data", type=Path, help="features directory (default: the one the run was trained on)")
    ap.add_argument("--k", type=int, default=10, help="cut-off of ndcg@K and recall@K (full protocol)")
    ap.add_argument("--no-popularity", action="store_true", help="skip the popularity baseline")
    ap.add_argument("--baselines", action="store_true",
                    help="full protocol: also popularity over all canvases and BPR-MF (tuned on valid)")  # fmt: skip
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    try:
        res = run(args.source, args.split, args.protocol, args.checkpoint, args.data, args.k,
                  popularity=not args.no_popularity, baselines=args.baselines)  # fmt: skip
    except (OSError, ValueError, KeyError) as e:
        ap.exit(2, f"error: {e}\n")
    for protocol, by in res["protocols"].items():
        base = by.get("popularity", by["model"])
        print(format_table(by["model"], base, f"{args.split} {protocol}"), file=sys.stderr)
        for name in sorted(set(by) - {"model", "popularity"}):
            cells = ", ".join(f"{t} {m[f'ndcg@{args.k}']:.4f}" for t, m in sorted(by[name].items()))
            print(f"{name} ndcg@{args.k}: {cells}", file=sys.stderr)
    text = json.dumps(res, indent=2, sort_keys=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return res


if __name__ == "__main__":
    main()
