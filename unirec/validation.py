"""What training scores on the valid split: the model and the popularity baseline, under one protocol
(``trainer.valid_protocol``), with the metric code of :mod:`unirec.evaluate`.

The protocol decides which checkpoint is best, each task's best step and when patience stops a run, so
it should be the protocol the model is judged by: sampled metrics can order checkpoints otherwise than
full ranking does (Krichene and Rendle, KDD 2020).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from unirec.config import ValidProtocol
from unirec.data.features import Featurizer
from unirec.distributed import Dist
from unirec.evaluate import (
    evaluate,
    full_ranking,
    model_matrix_scorer,
    model_scorer,
    popularity_matrix_scorer,
    popularity_scorer,
)
from unirec.report import Scores
from unirec.schema import FeatureSpec

SPLIT = "valid"
FULL_METRICS = ("ndcg@10", "recall@10", "mrr")
"""The metrics of the full protocol (:func:`unirec.evaluate.full_ranking` at its default cut-off)."""
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

    def model(self, model: torch.nn.Module, device: torch.device) -> Scores:
        """Per-task metrics of ``model`` (eval mode, then back to train mode); fp32, since bf16 logits tie
        often within a slate and ties would fall back to logged order."""
        model.eval()
        try:
            if self.protocol is ValidProtocol.full:
                return self._full(model_matrix_scorer(model, *self._catalogues(), device))
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
