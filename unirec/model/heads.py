"""Per-task heads, keyed by task name."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TaskHeads(nn.Module):
    """One small MLP per task. ``forward``: every head scores every row, the caller picks each row's own;
    :meth:`pick`: only each row's own head runs (serving).

    Computing all heads keeps every head in the graph of every step, which DDP needs when a task is absent
    from some rank's batch; the cost is K tiny MLPs, which serving, one task per request, need not pay.

    Args:
        tasks: task names, in head order.
        width: input width W.
        hidden: hidden width of each head.

    Shapes: [B, W] -> [B, K]; or [B, K, W] (a representation per task, e.g. from MMoE) -> [B, K], head k
    reading slice k.

    Example:
        >>> heads = TaskHeads(["home", "search"], 8, 4)
        >>> heads(torch.zeros(3, 8)).shape
        torch.Size([3, 2])
        >>> heads.pick(torch.zeros(3, 8), torch.tensor([1, 1, 1])).shape
        torch.Size([3])
    """

    def __init__(self, tasks: Sequence[str], width: int, hidden: int):
        super().__init__()
        self.names = list(tasks)
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for t in self.names}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return torch.cat([self.heads[t](x[:, k]) for k, t in enumerate(self.names)], dim=1)
        return torch.cat([self.heads[t](x) for t in self.names], dim=1)

    def pick(self, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Each row's own head only: x [B, W] or [B, K, W], head index [B] -> [B] logits, equal to
        ``forward(x).gather(1, head[:, None])`` with the heads no row names left out (one, in serving)."""
        ks = torch.unique(head).tolist()
        if len(ks) == 1:
            return self._one(x, ks[0])
        out = x.new_empty(x.shape[0])
        for k in ks:
            rows = (head == k).nonzero().squeeze(1)
            out[rows] = self._one(x[rows], k)
        return out

    def _one(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return self.heads[self.names[k]](x[:, k] if x.dim() == 3 else x).squeeze(1)
