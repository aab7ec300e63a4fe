"""The sampled protocol: the split's logged candidates of every request, ranked per task.

For MovieLens, the positive plus 100 sampled items the user never interacted with (the NCF-style protocol;
with one positive per request ``recall@10`` is HR@10); for the synthetic canvases, the logged impressions.
Training validates with this protocol by default (:mod:`unirec.validation`). The metric code is
:class:`unirec.metrics.TaskMetrics`, the same for the model and the popularity baseline.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from unirec.data.batch import Batch
from unirec.data.loader import eval_batches
from unirec.data.prepare import popularity_counts
from unirec.metrics import Scores, TaskMetrics
from unirec.schema import FeatureSpec


def evaluate(
    score: Callable[[Batch], torch.Tensor],
    features: Path,
    spec: FeatureSpec,
    split: str,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    tasks: Optional[Sequence[str]] = None,
) -> Scores:
    """Per-task metrics of ``score`` (batch -> [B] scores) over every row of ``split``, for every task of
    ``spec`` or only ``tasks``.

    Under torchrun each rank scores its share of the rows; torchmetrics gathers the states of every rank
    before computing, so every rank returns the metrics of the whole split.
    """
    chosen = [t for t in spec.tasks if tasks is None or t in tasks]
    metrics = TaskMetrics({t: spec.tasks[t].metrics for t in chosen})
    for task in chosen:
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
