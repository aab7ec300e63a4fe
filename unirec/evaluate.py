"""Offline evaluation: the model and the popularity baseline scored with the same per-task metric code."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pyarrow.parquet as pq
import torch

from unirec.data.loader import Batch, eval_batches
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
            return torch.sigmoid(model(batch.to(device)).double()).cpu()

    return score


def popularity_scorer(features: Path, spec: FeatureSpec, seed: int = 0) -> Callable[[Batch], torch.Tensor]:
    """Batch -> train engagement count of each candidate within its task (a tiny seeded jitter breaks ties,
    so shard order can never leak into the ranking)."""
    pop = pq.read_table(Path(features) / "popularity.parquet")
    names = pop["task"].to_numpy(zero_copy_only=False)
    index, count = pop["index"].to_numpy().astype(np.int64), pop["count"].to_numpy().astype(np.float64)
    # task_type id -> (candidate id field, engagement count per id index), built once
    tables: Dict[int, tuple] = {}
    for task, t in spec.tasks.items():
        id_field = spec.candidates[t.candidate].id_field
        counts = np.zeros(spec.candidate_fields[id_field].size, dtype=np.float64)
        mine = names == task
        counts[index[mine]] = count[mine]
        tables[t.id] = (id_field, counts)
    rng = np.random.default_rng(seed)

    def score(batch: Batch) -> torch.Tensor:
        tt = batch.task_type.numpy()
        out = np.empty(len(tt), dtype=np.float64)
        for type_id, (id_field, counts) in tables.items():
            rows = tt == type_id
            out[rows] = counts[batch.candidate[id_field].numpy()[rows]]
        return torch.from_numpy(out + rng.uniform(0, 1e-3, size=len(out)))

    return score
