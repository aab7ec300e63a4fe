"""The shared tower: residual blocks with explicit feature crossing."""

from __future__ import annotations

import torch
from torch import nn


class CrossBlock(nn.Module):
    """One DCN-v2 style cross (``x0 * (W x + b)``) followed by a pre-norm MLP, each with a residual.

    The cross makes multiplicative feature interactions cheap to learn; the residuals keep deep stacks
    trainable, as in the unified ranking models that replace several bespoke ones.

    Shapes: x0, x: [B, W] -> [B, W]
    """

    def __init__(self, width: int, dropout: float = 0.0):
        super().__init__()
        self.cross = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + x0 * self.cross(x)
        return x + self.mlp(self.norm(x))


class ResidualCrossTower(nn.Module):
    """A stack of :class:`CrossBlock`; every block crosses with the tower's input ``x0``.

    Args:
        width: input and output width W.
        layers: number of blocks.
        dropout: dropout inside each block's MLP.

    Shapes: [B, W] -> [B, W]

    Example:
        >>> ResidualCrossTower(8, 2)(torch.zeros(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, width: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(CrossBlock(width, dropout) for _ in range(layers))
        self.out_norm = nn.LayerNorm(width)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for block in self.blocks:
            x = block(x0, x)
        return self.out_norm(x)
