"""Per-task masked binary cross-entropy: a row trains only its own task's head."""

from __future__ import annotations

from typing import Callable, Optional, Tuple

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
    per_row = F.binary_cross_entropy_with_logits(logits.float(), label.float(), reduction="none") * weight
    sums = torch.zeros(num_tasks, device=logits.device).index_add(0, head, per_row)
    wsum = torch.zeros(num_tasks, device=logits.device).index_add(0, head, weight.float())
    counts = torch.zeros(num_tasks, device=logits.device).index_add(0, head, torch.ones_like(per_row))
    if all_sum is not None:
        wsum = all_sum(wsum)
    return sums / wsum.clamp_min(1e-12) * world, counts


def total_loss(losses: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the per-task losses ([K] each) -> scalar."""
    return (losses * loss_weights).sum()
