"""What training scores on the valid split: the model and the popularity baseline, under one protocol
(``trainer.valid_protocol``), with the metric code of :mod:`unirec.sampled` and :mod:`unirec.ranking`.

The protocol decides which checkpoint is best, each task's best step and when patience stops a run, so
it should be the protocol the model is judged by: sampled metrics can order checkpoints otherwise than
full ranking does (Krichene and Rendle, KDD 2020).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch

from unirec.config import ValidProtocol
from unirec.data.batch import prefixed_tensors
from unirec.data.features import Featurizer
from unirec.distributed import Dist
from unirec.metrics import Scores
from unirec.ranking import (
    Requests,
    full_ranking,
    model_matrix_scorer,
    popularity_matrix_scorer,
    rank_metrics,
    ranking_requests,
    seen_items,
)
from unirec.sampled import evaluate, model_scorer, popularity_scorer
from unirec.schema import FeatureSpec

log = logging.getLogger("unirec.validation")

SPLIT = "valid"
FULL_METRICS = ("ndcg@10", "recall@10", "mrr")
"""The metrics of the full protocol (:func:`unirec.ranking.full_ranking` at its default cut-off)."""
PRIOR_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
"""The transition prior weights :func:`calibrate_transitions` tries (0: the network alone)."""
COUNTS = ("requests", "unrankable")
"""Keys of a full-ranking result that count requests rather than score them: not logged as metrics."""


class Validation:
    """Scores a model (and popularity) on the valid split under ``protocol``.

    Args:
        features: the prepared features directory.
        spec: its feature spec.
        protocol: sampled (the split's logged candidates, sharded over ranks) or full (every valid
            request against its whole catalogue, minus the user's train items; every rank computes all of
            it, which is cheap for catalogues of thousands).
        batch_size: rows per scoring batch of the sampled protocol.
        dist: this process's rank among the ranks (the sampled protocol shards the rows over them).

    Example:
        >>> Validation(Path("."), None, ValidProtocol.sampled, 1024).protocol.value
        'sampled'
    """

    def __init__(
        self,
        features: Path,
        spec: FeatureSpec,
        protocol: ValidProtocol,
        batch_size: int,
        dist: Optional[Dist] = None,
    ):
        dist = dist or Dist()
        self.features, self.spec, self.protocol = Path(features), spec, ValidProtocol(protocol)
        self.batch_size, self.rank, self.world = batch_size, dist.rank, dist.world
        self._loaded: Optional[Tuple[Featurizer, Dict]] = None
        self._requests: Dict[str, Requests] = {}  # the valid requests of the prior's tasks, read once

    def model(self, model: torch.nn.Module, device: torch.device) -> Scores:
        """Per-task metrics of ``model`` (eval mode, then back to train mode); fp32, since bf16 logits tie
        often within a slate and ties would fall back to logged order. A transition prior fitted on valid
        (``model.transitions_fit=valid``) gets its weights first (:func:`calibrate_transitions`); under the
        full protocol the calibration's own ranking at the chosen weight is those tasks' metrics, so each
        request is scored once."""
        model.eval()
        try:
            calibrated: Scores = {}
            prior = getattr(model, "transitions", None)
            if prior is not None and prior.fit == "valid":
                root, (featurizer, cats) = self.features.parent, self._catalogues()
                chosen = calibrate_transitions(
                    model, root, featurizer, cats, device, requests=self._requests, scores=calibrated
                )
                log.info("transition prior weights, fitted on valid: %s", chosen)
            if self.protocol is ValidProtocol.full:
                scorer = model_matrix_scorer(model, *self._catalogues(), device)
                scorer.tasks = [t for t in self.spec.tasks if t not in calibrated]
                return {**self._full(scorer), **calibrated}
            scorer = model_scorer(model, device, autocast=False)
            return evaluate(scorer, self.features, self.spec, SPLIT, self.batch_size, self.rank, self.world)
        finally:
            model.train()

    def popularity(self, seed: int) -> Scores:
        """The same metrics of the task's own train popularity."""
        if self.protocol is ValidProtocol.full:
            return self._full(popularity_matrix_scorer(self.features, *self._catalogues(), seed))
        scorer = popularity_scorer(self.features, self.spec, seed)
        return evaluate(scorer, self.features, self.spec, SPLIT, self.batch_size, self.rank, self.world)

    def _catalogues(self) -> Tuple[Featurizer, Dict]:
        """The featurizer and every candidate type's catalogue ids, loaded on first use."""
        if self._loaded is None:
            featurizer = Featurizer.load(self.features)
            self._loaded = featurizer, {c: featurizer.catalogue_ids(c) for c in featurizer.spec.candidates}
        return self._loaded

    def _full(self, scorer) -> Scores:
        featurizer, cats = self._catalogues()
        scores = full_ranking({"m": scorer}, self.features.parent, featurizer.spec, SPLIT, cats)["m"]
        return {task: {k: v for k, v in s.items() if k not in COUNTS} for task, s in scores.items()}


def calibrate_transitions(
    model,
    root: Path,
    featurizer: Featurizer,
    catalogues: Dict[str, pa.Array],
    device=None,
    grid: Sequence[float] = PRIOR_GRID,
    chunk: int = 1024,
    requests: Optional[Dict[str, Requests]] = None,
    scores: Optional[Scores] = None,
) -> Dict[str, float]:
    """Set each prior task's weight to the value of ``grid`` whose ``logit + w * log(1 + s)`` ranks the
    valid split best (full-ranking ndcg@10, the network held as it is); task -> the weight chosen.

    The network's logits and the prior's term are computed once per request (in chunks of ``chunk``
    requests), and every weight of the grid is scored from them. ``requests``: a cache of each task's valid
    requests, filled on first use (a run calibrates at every validation; the split is read once).
    ``scores``: filled with each calibrated task's full-ranking metrics (:data:`FULL_METRICS`, means over
    its requests) at the chosen weight, as :func:`unirec.ranking.full_ranking` would give them."""
    prior, spec = model.transitions, featurizer.spec
    chosen = {}
    for k, task in enumerate(model.task_names):
        if not bool(prior.uses[k]):
            continue
        ctype = spec.tasks[task].candidate
        cat = catalogues[ctype]
        cache = {} if requests is None else requests
        if task not in cache:
            cache[task] = ranking_requests(root, SPLIT, task, cat, seen_items(root, cat, "user", SPLIT))
        req = cache[task]
        if not req.context.num_rows:
            continue
        ids = prefixed_tensors(featurizer.candidates(ctype, cat), "cand.")[prior.id_field].to(device)
        with torch.no_grad():
            prior.weight[k] = 0.0
        network = model_matrix_scorer(model, featurizer, {ctype: cat}, device, logits=True)
        parts: List[Dict[str, List[np.ndarray]]] = [{} for _ in grid]
        for a in range(0, req.context.num_rows, chunk):
            part = req.context.slice(a, chunk)
            base = network(task, part)
            ctx = prefixed_tensors(featurizer.context(part), "ctx.")
            with torch.inference_mode():
                term = prior.request_rows({f: t.to(device) for f, t in ctx.items()})[:, ids].double().cpu()
            pos, exc = req.positives[a : a + chunk], req.exclude[a : a + chunk]
            for g, w in enumerate(grid):
                for key, v in rank_metrics(base + w * term, pos, exc, 10).items():
                    parts[g].setdefault(key, []).append(v)
        means = [{key: float(np.concatenate(v).mean()) for key, v in p.items()} for p in parts]
        g = int(np.argmax([m["ndcg@10"] for m in means]))  # the first of equals: the smaller weight
        with torch.no_grad():
            prior.weight[k] = float(grid[g])
        chosen[task] = float(grid[g])
        if scores is not None:
            scores[task] = {key: means[g][key] for key in FULL_METRICS}
    return chosen
