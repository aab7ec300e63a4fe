"""Per-task losses: a row trains only its own task's head.

A task trains with pointwise binary cross-entropy on its logged rows (``bce``, for logged impressions), or
on its positives alone against in-batch candidates: a sampled softmax with the log-Q correction, or BPR
(``task.<name>.loss``, :class:`Objective`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


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
