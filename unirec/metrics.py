"""Per-task evaluation metrics (torchmetrics), named ``{split}/{task}/{metric}`` in logs.

Ranking metrics group rows by request id: NDCG@K, Recall@K and MRR are computed per request and averaged
over requests that have at least one positive (requests without one are skipped, not scored as 0).
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC
from torchmetrics.retrieval import RetrievalMRR, RetrievalNormalizedDCG, RetrievalRecall

_AT_K = re.compile(r"^(ndcg|recall)@(\d+)$")

Scores = Dict[str, Dict[str, float]]
"""Task -> metric name -> value: what an evaluation of either protocol returns."""


def build_metric(name: str) -> Metric:
    """``auc``, ``mrr``, ``ndcg@K`` or ``recall@K``.

    >>> type(build_metric("ndcg@10")).__name__
    'RetrievalNormalizedDCG'
    """
    if name == "auc":
        return BinaryAUROC()
    if name == "mrr":
        return RetrievalMRR(empty_target_action="skip")
    m = _AT_K.match(name)
    if m:
        cls = RetrievalNormalizedDCG if m.group(1) == "ndcg" else RetrievalRecall
        return cls(top_k=int(m.group(2)), empty_target_action="skip")
    raise ValueError(f"unknown metric {name!r}: use auc, mrr, ndcg@K or recall@K (task.<name>.metrics)")


class TaskMetrics:
    """One metric collection per task.

    Args:
        metrics: task name -> metric names.
    """

    def __init__(self, metrics: Mapping[str, Sequence[str]]):
        # Plain dicts, not MetricCollection: its compute groups share state between metrics that are
        # updated together, and the ranking metrics here are updated one by one.
        self.tasks = {t: {m: build_metric(m) for m in names} for t, names in metrics.items()}

    def update(self, task: str, scores: torch.Tensor, label: torch.Tensor, request_id: torch.Tensor) -> None:
        """Scores and labels [B] of one task's rows; request ids group the ranking metrics."""
        scores, label, request_id = scores.detach().float().cpu(), label.cpu(), request_id.cpu()
        for _name, metric in self.tasks[task].items():
            if isinstance(metric, BinaryAUROC):
                metric.update(scores, label.long())
            else:
                metric.update(scores, label.long(), indexes=request_id)

    def compute(self) -> Dict[str, Dict[str, float]]:
        return {t: {m: float(metric.compute()) for m, metric in ms.items()} for t, ms in self.tasks.items()}

    def reset(self) -> None:
        for ms in self.tasks.values():
            for metric in ms.values():
                metric.reset()
