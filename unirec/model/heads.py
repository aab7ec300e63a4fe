"""Per-task heads, keyed by task name."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class TaskHeads(nn.Module):
    """One small MLP per task; every head scores every row, the caller picks each row's own.

    Computing all heads keeps every head in the graph of every step, which DDP needs when a task is absent
    from some rank's batch; the cost is K tiny MLPs.

    Args:
        tasks: task names, in head order.
        width: input width W.
        hidden: hidden width of each head.

    Shapes: [B, W] -> [B, K]; or [B, K, W] (a representation per task, e.g. from MMoE) -> [B, K], head k
    reading slice k.

    Example:
        >>> TaskHeads(["home", "search"], 8, 4)(torch.zeros(3, 8)).shape
        torch.Size([3, 2])
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
