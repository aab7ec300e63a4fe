"""Baselines beside the model in the full-ranking protocol: pooled popularity, BPR-MF and item transitions.

- **popularity, all canvases** (:func:`unirec.ranking.popularity_matrix_scorer` with ``pooled``): every
  request of a task gets the train
  engagement counts of its candidate type summed over every task that ranks that type, the list a team
  would ship before any model (the per-task popularity of :mod:`unirec.ranking` counts one canvas only).
- **BPR-MF** (:func:`fit_bpr`): matrix factorisation with the BPR loss (Rendle et al., 2009) over every
  train interaction of every user (``raw/interactions.parquet`` when the data set has one, else the
  positives of the tasks whose requests carry a user), uniform negatives, early stopping on the valid
  split's full-ranking ndcg@10 of those tasks, and a small grid of widths and L2 strengths picked on valid.
  It scores only tasks whose requests carry a user: a request without one has no row to factorise.

- **item transitions** (:func:`fit_transitions`): a first-order sequential baseline (a Markov chain over
  items, in the spirit of item-to-item "what came next" lists). Over every user's train engagements in
  time order it counts how often item b came within ``K`` events after item a (weight 1/d at distance d);
  a request's score for b sums the counts from its ``m`` most recent history items (weight 1/j for the
  j-th most recent), ties broken by pooled train popularity. K and m are picked on valid. It scores the
  tasks whose context has an ordered field (the history) over the candidates' id table.

All are :data:`unirec.ranking.MatrixScorer` s, so they rank exactly the requests, catalogue and
exclusions the model does (:func:`unirec.ranking.full_ranking`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from unirec.data.features import Featurizer
from unirec.data.ids import normalise_ids
from unirec.data.prepare import popularity_counts
from unirec.kinds import kind_of
from unirec.ranking import (
    HISTORY,
    labeled,
    popularity_matrix_scorer,
    rank_metrics,
    ranking_requests,
    seen_items,
)

log = logging.getLogger("unirec.baselines")


class TaskScorer:
    """A matrix scorer that ranks only some tasks (``tasks``); full ranking skips the others."""

    def __init__(self, tasks: Sequence[str], score):
        self.tasks, self._score = frozenset(tasks), score

    def __call__(self, task: str, context: pa.Table) -> torch.Tensor:
        return self._score(task, context)


@dataclass(frozen=True)
class BPRConfig:
    """BPR-MF training; ``dims`` x ``l2`` is the grid picked on valid."""

    dims: Tuple[int, ...] = (32, 64, 128)
    l2: Tuple[float, ...] = (1e-5, 1e-4, 1e-3)
    """L2 penalty on the factors of each pair's user and items (per pair, as in the BPR paper)."""
    lr: float = 5e-3
    batch_size: int = 1024
    max_epochs: int = 200
    patience: int = 5
    """Epochs without a better valid ndcg@10 before stopping (validation every ``eval_every`` epochs)."""
    eval_every: int = 2
    seed: int = 0


class _MF(torch.nn.Module):
    def __init__(self, users: int, items: int, dim: int):
        super().__init__()
        self.user = torch.nn.Embedding(users, dim)
        self.item = torch.nn.Embedding(items, dim)
        self.bias = torch.nn.Embedding(items, 1)
        for e in (self.user, self.item):
            torch.nn.init.normal_(e.weight, std=0.1)
        torch.nn.init.zeros_(self.bias.weight)


def _interactions(seen: Dict[str, np.ndarray]) -> Tuple[Dict[str, int], np.ndarray]:
    """Each user's train items (:func:`unirec.ranking.seen_items` for valid) -> (raw user id -> row,
    [N, 2] (user row, catalogue row) train interactions)."""
    users = {u: i for i, u in enumerate(sorted(seen))}
    pairs = [np.stack([np.full(len(rows), users[u]), rows], 1) for u, rows in seen.items()]
    return users, (np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64))


def fit_bpr(
    root: Path,
    featurizer: Featurizer,
    catalogues: Dict[str, pa.Array],
    cfg: Optional[BPRConfig] = None,
    user_field: str = "user",
) -> Optional[TaskScorer]:
    """BPR-MF for the tasks whose requests carry ``user_field``, the grid point best on valid; None when no
    task has a user or the candidate types differ (one factorisation ranks one catalogue)."""
    cfg = cfg or BPRConfig()
    spec = featurizer.spec
    tasks = [t for t, ts in spec.tasks.items() if user_field in ts.fields]
    types = {spec.tasks[t].candidate for t in tasks}
    if not tasks or len(types) != 1:
        return None
    ctype = types.pop()
    # A valid request excludes the user's train items: the interactions BPR-MF trains on, read once.
    seen = seen_items(Path(root), catalogues[ctype], user_field, "valid")
    users, pairs = _interactions(seen)
    if not len(pairs):
        return None
    valid = {t: ranking_requests(Path(root), "valid", t, catalogues[ctype], seen, user_field) for t in tasks}
    n_items = len(catalogues[ctype])
    best: Tuple[float, Optional[TaskScorer], dict] = (-1.0, None, {})
    for dim in cfg.dims:
        for l2 in cfg.l2:
            value, scorer, epochs = _fit_one(valid, n_items, tasks, users, pairs, dim, l2, cfg)
            log.info("bpr-mf dim %d l2 %g: valid ndcg@10 %.4f after %d epochs", dim, l2, value, epochs)
            if value > best[0]:
                best = (value, scorer, {"dim": dim, "l2": l2, "epochs": epochs, "valid_ndcg@10": value})
    scorer = best[1]
    scorer.chosen = best[2]  # the grid point, reported beside the figures
    return scorer


def _fit_one(valid, n_items: int, tasks, users, pairs, dim: int, l2: float, cfg: BPRConfig):
    """One grid point, early-stopped on ``valid``: (best valid ndcg@10, its scorer, epochs run)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    mf = _MF(len(users), n_items, dim)
    opt = torch.optim.Adam(mf.parameters(), lr=cfg.lr)
    data = torch.from_numpy(pairs).long()
    best_value, best_state, since, epoch = -1.0, None, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):
        for b in torch.randperm(len(data), generator=gen).split(cfg.batch_size):
            u, i = data[b, 0], data[b, 1]
            j = torch.randint(0, n_items, (len(b),), generator=gen)
            pu, qi, qj = mf.user(u), mf.item(i), mf.item(j)
            x = (pu * (qi - qj)).sum(1) + mf.bias(i).squeeze(1) - mf.bias(j).squeeze(1)
            reg = l2 * (pu.pow(2).sum(1) + qi.pow(2).sum(1) + qj.pow(2).sum(1)).mean()
            loss = torch.nn.functional.softplus(-x).mean() + reg
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % cfg.eval_every:
            continue
        value = _valid_ndcg(valid, _scorer(mf, users, tasks))
        if value > best_value:
            best_value, since = value, 0
            best_state = {k: v.clone() for k, v in mf.state_dict().items()}
        else:
            since += 1
            if since >= cfg.patience:
                break
    mf.load_state_dict(best_state)
    return best_value, _scorer(mf, users, tasks), epoch


def _valid_ndcg(valid, scorer) -> float:
    """Mean over ``valid``'s tasks of the mean ndcg@10 of their requests (see :func:`_valid_requests`)."""
    per_task = []
    for task, req in valid.items():
        scores = scorer(task, req.context)
        per_task.append(rank_metrics(scores, req.positives, req.exclude, 10)["ndcg@10"].mean())
    return float(np.mean(per_task))


def _scorer(mf: _MF, users: Dict[str, int], tasks: Sequence[str], user_field: str = "user") -> TaskScorer:
    """Scores [R, C]; a user unseen in train gets the item biases alone."""
    with torch.no_grad():
        mean_user = torch.zeros(1, mf.user.embedding_dim)
        item, bias = mf.item.weight.detach().clone(), mf.bias.weight.detach().clone()
        user = torch.cat([mf.user.weight.detach(), mean_user])

    def score(task: str, context: pa.Table) -> torch.Tensor:
        raw = normalise_ids(context[user_field]).to_pylist()
        rows = torch.tensor([users.get(u, len(users)) for u in raw], dtype=torch.long)
        return (user[rows] @ item.T + bias.T).double()

    return TaskScorer(tasks, score)


@dataclass(frozen=True)
class TransitionsConfig:
    """The item-transition baseline; ``windows`` x ``recent`` is the grid picked on valid."""

    windows: Tuple[int, ...] = (1, 3, 10)
    """K: item b counts as following item a when it came at most K events later (weight 1/d at distance d)."""
    recent: Tuple[int, ...] = (1, 3, 10)
    """m: the request's most recent history items that vote (weight 1/j for the j-th most recent)."""
    max_items: int = 20_000
    """Largest catalogue it builds its dense [C, C] count matrix for (4 bytes a cell); beyond it, skipped."""


def fit_transitions(
    root: Path,
    featurizer: Featurizer,
    catalogues: Dict[str, pa.Array],
    cfg: Optional[TransitionsConfig] = None,
) -> Optional[TaskScorer]:
    """The transition baseline for the tasks whose context has an ordered field over their candidates' id
    table, the grid point best on valid; None when no task has one, their candidate types differ or the
    catalogue is over ``cfg.max_items``."""
    cfg = cfg or TransitionsConfig()
    spec, root = featurizer.spec, Path(root)
    field_of = {}
    for t, ts in spec.tasks.items():
        table = spec.candidate_fields[spec.candidates[ts.candidate].id_field].table
        ordered = [
            f for f in ts.fields if kind_of(spec.context[f]).ordered and spec.context[f].table == table
        ]
        if ordered:
            field_of[t] = ordered[0]
    types = {spec.tasks[t].candidate for t in field_of}
    if not field_of or len(types) != 1:
        return None
    ctype = types.pop()
    cat = catalogues[ctype]
    if len(cat) > cfg.max_items:
        log.info("transitions: %d candidates, over max_items=%d; skipped", len(cat), cfg.max_items)
        return None
    row_of = {c: i for i, c in enumerate(cat.to_pylist())}
    users, rows = _train_sequences(root, row_of)
    popularity = np.bincount(rows, minlength=len(cat)).astype(np.float32)
    tiebreak = 1e-3 * popularity / max(1.0, float(popularity.max()))  # below any count of 1/K
    seen = seen_items(root, cat, "user", "valid")
    valid = {t: ranking_requests(root, "valid", t, cat, seen) for t in field_of}
    best: Tuple[float, Optional[TaskScorer], dict] = (-1.0, None, {})
    for window in cfg.windows:
        counts = _transition_counts(users, rows, len(cat), window)
        for recent in cfg.recent:
            scorer = _transition_scorer(counts, tiebreak, row_of, field_of, recent)
            value = _valid_ndcg(valid, scorer)
            log.info("transitions K %d m %d: valid ndcg@10 %.4f", window, recent, value)
            if value > best[0]:
                best = (value, scorer, {"window": window, "recent": recent, "valid_ndcg@10": value})
    scorer = best[1]
    scorer.chosen = best[2]
    return scorer


def transition_table(features: Path, spec, id_field: str, window: int) -> np.ndarray:
    """The counts of the model's transition prior (:mod:`unirec.model.transitions`): [T, T] over the rows of
    ``id_field``'s table, from the train engagements of the prepared data set above ``features`` (the
    sentinel and out-of-vocabulary rows stay 0). Every catalogue's ids are featurized to their rows."""
    from unirec.kinds import FIRST_ID

    featurizer = Featurizer.load(Path(features))
    table = spec.candidate_fields[id_field].table
    row_of: Dict[str, int] = {}
    for ctype, cs in spec.candidates.items():
        if cs.id_field != id_field:
            continue
        ids = featurizer.catalogue_ids(ctype)
        rows = featurizer.candidates(ctype, ids)[f"cand.{id_field}"].to_numpy()
        row_of.update((i, int(r)) for i, r in zip(ids.to_pylist(), rows) if r >= FIRST_ID)
    users, rows = _train_sequences(Path(features).parent, row_of)
    counts = _transition_counts(users, rows, spec.tables[table].size, window)
    log.info(
        "transition prior: %d train engagements, %d item pairs within %d events",
        len(rows), int((counts > 0).sum()), window,
    )  # fmt: skip
    return counts


def _train_sequences(root: Path, row_of: Dict[str, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Every train engagement in (user, time) order -> (user codes [E], catalogue rows [E]): from
    ``raw/interactions.parquet`` when the data set has one (ties in its ``event_order``), else from the
    train positives of the tasks whose requests carry a user (ties by request id)."""
    import pyarrow.compute as pc

    path = root / "raw" / HISTORY
    if path.exists():
        t = pq.read_table(path)
        t = t.filter(pc.equal(t["split"], "train"))
        order = "event_order" if "event_order" in t.column_names else "timestamp"
        t = t.select(["user_id", "item_id", "timestamp", order]).rename_columns(["user", "item", "ts", "tie"])
    else:
        t = labeled(root, "train", None)
        t = t.filter(pc.and_(pc.greater(t["label"], 0), pc.is_valid(t["user"])))
        t = t.select(["user", "candidate", "timestamp", "request_id"]).rename_columns(
            ["user", "item", "ts", "tie"]
        )
    t = t.set_column(0, "user", normalise_ids(t["user"])).set_column(1, "item", normalise_ids(t["item"]))
    t = t.sort_by([("user", "ascending"), ("ts", "ascending"), ("tie", "ascending")])
    rows = np.array([row_of.get(i, -1) for i in t["item"].to_pylist()], dtype=np.int64)
    users = pc.dictionary_encode(t["user"]).combine_chunks().indices.to_numpy()
    keep = rows >= 0  # an item outside the catalogue breaks no chain: its neighbours become adjacent
    return users[keep], rows[keep]


def _transition_counts(users: np.ndarray, rows: np.ndarray, n: int, window: int) -> np.ndarray:
    """[n, n] weighted counts of b following a within ``window`` events of one user (weight 1/distance).

    >>> _transition_counts(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 1]), 3, 2).tolist()
    [[0.0, 1.0, 0.5], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    """
    counts = np.zeros((n, n), np.float32)
    for d in range(1, window + 1):
        same = users[:-d] == users[d:]
        np.add.at(counts, (rows[:-d][same], rows[d:][same]), np.float32(1.0 / d))
    return counts


def _transition_scorer(counts, tiebreak, row_of, field_of: Dict[str, str], recent: int) -> TaskScorer:
    weights = 1.0 / np.arange(recent, 0, -1, dtype=np.float32)  # oldest of the m first, the newest weighs 1

    def score(task: str, context: pa.Table) -> torch.Tensor:
        out = np.tile(tiebreak, (context.num_rows, 1))
        for r, history in enumerate(context[field_of[task]].to_pylist()):
            known = [row_of[i] for i in map(str, history or ()) if i in row_of][-recent:]
            if known:
                out[r] += weights[-len(known) :] @ counts[known]
        return torch.from_numpy(out).double()

    return TaskScorer(field_of, score)


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
    out = {"popularity_all": popularity_matrix_scorer(features, featurizer, catalogues, seed, pooled=True)}
    fitted = {
        "bpr_mf": fit_bpr(Path(features).parent, featurizer, catalogues, BPRConfig(seed=seed)),
        "transitions": fit_transitions(Path(features).parent, featurizer, catalogues),
    }
    out.update({name: scorer for name, scorer in fitted.items() if scorer is not None})
    return out
