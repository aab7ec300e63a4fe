"""Per-task losses: a row trains only its own task's head.

A task trains with pointwise binary cross-entropy on its logged rows (``bce``, for logged impressions), or
on its positives alone against in-batch candidates: a sampled softmax with the log-Q correction, or BPR
(``task.<name>.loss``, :class:`Objective`). :func:`build_objective` makes a run's objective from its config
and prepared data (the log-Q shares, the catalogues).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from unirec.config import Config
    from unirec.schema import FeatureSpec


def task_losses(
    logits: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    head: torch.Tensor,
    num_tasks: int,
    all_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    world: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean BCE of each task over its own rows.

    Args:
        logits: [B] each row's own-task logit.
        label, weight: [B].
        head: [B] head index (0..K-1) of each row.
        num_tasks: K.
        all_sum: under DDP, sums a tensor over ranks. Each task is then normalised by its weight over the
            *global* batch and scaled by ``world``, so DDP's gradient average is exactly the gradient of
            the mean over all ranks' rows, even when a task is absent from some rank's batch.
        world: number of ranks.

    Returns:
        losses [K] (0 for a task with no rows in the batch, with zero gradient) and row counts [K].

    Example:
        >>> l, n = task_losses(torch.zeros(3), torch.tensor([1., 0., 1.]), torch.ones(3), torch.tensor([0, 0, 1]), 3)
        >>> [round(x, 4) for x in l.tolist()], n.tolist()
        ([0.6931, 0.6931, 0.0], [2.0, 1.0, 0.0])
    """
    return task_mean(row_bce(logits, label), weight, head, num_tasks, all_sum, world)


def row_bce(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """[B] logits and labels -> [B] per-row binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits.float(), label.float(), reduction="none")


def sampled_softmax(
    pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, logq_pos=None, logq_neg=None
) -> torch.Tensor:
    """Cross-entropy of each positive against its candidates, log-Q corrected.

    Args:
        pos: [P] the positives' logits.
        neg: [P, M] each positive's logits of the M candidates.
        valid: [P, M] False where a candidate must not count as a negative (the positive's own item, another
            positive of its request).
        logq_pos, logq_neg: [P] and [P, M] log sampling probabilities subtracted from the logits (None: none).

    Returns: [P] ``-log softmax`` of the positive.

    Example:
        >>> l = sampled_softmax(torch.zeros(1), torch.zeros(1, 3), torch.tensor([[True, True, False]]))
        >>> round(l.item(), 4)  # log 3: the positive against two valid candidates
        1.0986
    """
    pos, neg = pos.float(), neg.float()
    if logq_pos is not None:
        pos, neg = pos - logq_pos, neg - logq_neg
    logits = torch.cat([pos.unsqueeze(1), neg.masked_fill(~valid, float("-inf"))], dim=1)
    return torch.logsumexp(logits, dim=1) - pos


def bpr(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[P] mean over each positive's valid candidates of ``-log sigmoid(pos - neg)`` (0 without any).

    Example:
        >>> round(bpr(torch.zeros(1), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)).item(), 4)
        0.6931
    """
    pair = F.softplus(neg.float() - pos.float().unsqueeze(1)) * valid
    return pair.sum(1) / valid.sum(1).clamp_min(1)


class Objective:
    """Each task's training loss, per row, ready for :func:`task_mean` (see ``task.<name>.loss``).

    bce tasks train on every row. A softmax or bpr task trains on its positive rows only: each is scored
    against ``negatives`` rows of the same task drawn from the batch (the batch's other candidates, logged
    negatives included), shared by the task's positives.

    Args:
        kinds: per head, "bce", "softmax" or "bpr".
        negatives: M, candidates drawn per task and step.
        logq: per head, [V] log share of each candidate id among the task's train rows (softmax with log-Q
            correction), or None.
        id_field: per head, the candidate field holding the candidate id.
        catalogues: per head, None or the task's whole catalogue for a full-catalogue softmax beside the
            sampled one (``loss.catalogue``): (candidate fields [C, ...], its candidate type, [V] catalogue
            row of each candidate id, -1 for an id no single row holds).
        catalogue_weight: that softmax's weight in the row's loss.
    """

    def __init__(
        self,
        kinds: Sequence[str],
        negatives: int,
        logq: Sequence,
        id_field: Sequence[str],
        catalogues: Optional[Sequence] = None,
        catalogue_weight: float = 0.0,
    ):
        self.kinds, self.negatives, self.logq, self.id_field = (
            list(kinds),
            negatives,
            list(logq),
            list(id_field),
        )
        self.sampled = [k for k, kind in enumerate(self.kinds) if kind != "bce"]
        self.catalogues = list(catalogues) if catalogues is not None else [None] * len(self.kinds)
        self.catalogue_weight = catalogue_weight

    def catalogue_requests(self, pools) -> Optional[list]:
        """What :meth:`unirec.model.ranker.MultiTaskRanker.forward` scores against whole catalogues for
        ``pools``: (positive rows, candidate fields, candidate type) per pool whose task has a catalogue;
        None when no task has one."""
        if not any(c is not None for c in self.catalogues):
            return None
        return [(rows, *self.catalogues[k][:2]) for k, rows, _ in pools if self.catalogues[k] is not None]

    def pools(self, batch, head: torch.Tensor, generator: Optional[torch.Generator] = None):
        """Per sampled task present in the batch: (head k, positive rows [P], pool rows [M])."""
        out = []
        for k in self.sampled:
            mine = torch.nonzero(head == k).squeeze(1)
            rows = mine[batch.label[mine] > 0]
            if len(rows) == 0:
                continue
            order = torch.randperm(len(mine), generator=generator, device="cpu").to(mine.device)
            out.append((k, rows, mine[order[: self.negatives]]))
        return out

    def forward_logits(self, model: Callable, batch, pools: Sequence) -> Tuple:
        """What :meth:`row_losses` reads from one forward of ``model`` (the ranker, its wrapper, or a
        ``functional_call`` of it): own logits [B], the pools' pair logits, the catalogue logits (both lists,
        empty for a bce-only objective). ``pools``: :meth:`pools` of the batch (``[]`` when not sampled)."""
        if not self.sampled:
            return model(batch), [], []
        pairs_of = [(rows, pool) for _, rows, pool in pools]
        cats = self.catalogue_requests(pools)
        if cats is None:
            logits, pairs = model(batch, pairs_of)
            return logits, pairs, []
        return model(batch, pairs_of, cats)

    def row_losses(
        self, batch, head, own: torch.Tensor, pools, pairs, catalogue_logits: Sequence = ()
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss [B] and weight [B] (0 on a sampled task's non-positive rows); ``catalogue_logits``:
        the [P, C] logits of :meth:`catalogue_requests`, in its order."""
        loss = row_bce(own, batch.label)
        weight = batch.weight.float().clone()
        full = iter(catalogue_logits)
        for (k, rows, pool), neg in zip(pools, pairs):
            ids = batch.candidate[self.id_field[k]]
            valid = ids[pool].unsqueeze(0) != ids[rows].unsqueeze(1)
            same_request = batch.request_id[pool].unsqueeze(0) == batch.request_id[rows].unsqueeze(1)
            valid &= ~(same_request & (batch.label[pool] > 0).unsqueeze(0))
            if self.kinds[k] == "bpr":
                per = bpr(own[rows], neg, valid)
            elif self.logq[k] is not None:
                lq = self.logq[k]
                per = sampled_softmax(own[rows], neg, valid, lq[ids[rows]], lq[ids[pool]].expand_as(neg))
            else:
                per = sampled_softmax(own[rows], neg, valid)
            if self.catalogues[k] is not None:
                target = self.catalogues[k][2][ids[rows]]
                ce = F.cross_entropy(next(full).float(), target.clamp_min(0), reduction="none")
                per = per + self.catalogue_weight * ce * (target >= 0)
            mine = head == k
            weight = torch.where(mine, torch.zeros_like(weight), weight)
            weight[rows] = batch.weight[rows].float()
            loss = loss.index_put((rows,), per)
        return loss, weight


def task_mean(
    per_row: torch.Tensor,
    weight: torch.Tensor,
    head: torch.Tensor,
    num_tasks: int,
    all_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    world: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of a per-row loss over each task's rows: see :func:`task_losses` (whose BCE it
    generalises); returns losses [K] and each task's rows that carry weight in the batch [K]."""
    per_row = per_row * weight
    sums = torch.zeros(num_tasks, device=per_row.device).index_add(0, head, per_row)
    wsum = torch.zeros(num_tasks, device=per_row.device).index_add(0, head, weight.float())
    # A task is present where it has rows that carry a loss (a softmax task's negatives carry none).
    counts = torch.zeros(num_tasks, device=per_row.device).index_add(0, head, (weight > 0).to(per_row.dtype))
    if all_sum is not None:
        wsum = all_sum(wsum)
    return sums / wsum.clamp_min(1e-12) * world, counts


def total_loss(losses: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the per-task losses ([K] each) -> scalar."""
    return (losses * loss_weights).sum()


def build_objective(cfg: Config, spec: FeatureSpec, names: List[str], features: Path, device) -> Objective:
    """Each head's loss; a softmax task with ``loss.logq`` gets the log share of every candidate id among
    its train rows (the in-batch sampling distribution)."""
    kinds = [cfg.task[t].loss.value for t in names]
    id_fields = [spec.candidates[spec.tasks[t].candidate].id_field for t in names]
    logq = [
        candidate_log_share(features, t, f, spec, device) if k == "softmax" and cfg.loss.logq else None
        for t, k, f in zip(names, kinds, id_fields)
    ]
    catalogues = None
    if cfg.loss.catalogue > 0:
        types = {spec.tasks[t].candidate for t, k in zip(names, kinds) if k == "softmax"}
        of_type = catalogues_of(features, spec, types, device)  # one per type, shared by its tasks
        catalogues = [
            of_type[spec.tasks[t].candidate] if k == "softmax" else None for t, k in zip(names, kinds)
        ]
    return Objective(kinds, cfg.loss.negatives, logq, id_fields, catalogues, cfg.loss.catalogue)


def catalogues_of(features: Path, spec: FeatureSpec, types, device) -> Dict:
    """Candidate type -> its whole catalogue for the full-catalogue softmax: (its featurized fields [C, ...],
    the type, [V] catalogue row of each candidate id; -1 for the sentinel, OOV and any id several rows share)."""
    from unirec.data.batch import prefixed_tensors
    from unirec.data.features import Featurizer
    from unirec.kinds import FIRST_ID

    featurizer = Featurizer.load(features) if types else None
    out = {}
    for ctype in sorted(types):
        fields = prefixed_tensors(featurizer.candidates(ctype, featurizer.catalogue_ids(ctype)), "cand.")
        id_field = spec.candidates[ctype].id_field
        ids = fields[id_field]
        size = max(spec.tables[spec.candidate_fields[id_field].table].size, int(ids.max()) + 1)
        row = torch.full((size,), -1, dtype=torch.long)
        once = torch.bincount(ids, minlength=size) == 1
        keep = (ids >= FIRST_ID) & once[ids]
        row[ids[keep]] = torch.arange(len(ids))[keep]
        out[ctype] = ({f: t.to(device) for f, t in fields.items()}, ctype, row.to(device))
    return out


def candidate_log_share(features: Path, task: str, id_field: str, spec: FeatureSpec, device) -> torch.Tensor:
    """[V] log of each candidate id's share of ``task``'s train rows (-inf for an id never drawn)."""
    import pyarrow.parquet as pq

    from unirec.data.loader import shard_files

    column = f"cand.{id_field}"
    ids = torch.cat(
        [torch.from_numpy(pq.read_table(f, columns=[column])[column].to_numpy().astype("int64"))
         for f in shard_files(features, "train", task)]
    )  # fmt: skip
    size = max(spec.tables[spec.candidate_fields[id_field].table].size, int(ids.max()) + 1)
    counts = torch.bincount(ids, minlength=size).double()
    return (counts / counts.sum()).log().float().to(device)
