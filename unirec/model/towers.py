"""Towers between the interaction vector and the per-task heads, chosen with ``model.tower``.

Every tower takes ``x0`` [B, W] and each row's head index [B] and returns either one shared representation
[B, W] or one per task [B, K, W]; :class:`unirec.model.heads.TaskHeads` reads either, so heads, losses and
serving never depend on the choice.

- ``cross`` (:class:`ResidualCrossTower`): shared bottom of residual cross blocks, each a DCN-v2 cross
  followed by a pre-norm MLP (the core default).
- ``mlp`` (:class:`SharedBottomTower`): the classic shared bottom, a plain ReLU MLP.
- ``dcn_v2`` (:class:`DCNv2Tower`): DCN-v2 in its stacked form (Wang et al., 2021), a cross network of
  ``x0 * (W x + b) + x`` layers, then a deep MLP.
- ``mmoe`` (:class:`MMoETower`): shared experts mixed by one softmax gate per task (Ma et al., 2018).
- ``ple`` (:class:`PLETower`): stacked customized gate control, task-specific plus shared experts
  (Tang et al., 2020).
- ``task_conditioned`` (:class:`TaskConditionedTower`): the cross blocks with every block's input scaled
  by a learned per-task gate (in the spirit of STAR and PEPNet); one network, task-shaped.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

TOWERS = ("cross", "mlp", "dcn_v2", "mmoe", "ple", "task_conditioned")


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

    def forward(self, x0: torch.Tensor, head: torch.Tensor = None) -> torch.Tensor:
        x = x0
        for block in self.blocks:
            x = block(x0, x)
        return self.out_norm(x)


class SharedBottomTower(nn.Module):
    """The classic shared bottom: ``layers`` ReLU layers of width W, shared by every task.

    Shapes: [B, W] -> [B, W]

    Example:
        >>> SharedBottomTower(8, 2)(torch.zeros(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, width: int, layers: int, dropout: float = 0.0):
        super().__init__()
        mods: List[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*mods)

    def forward(self, x0: torch.Tensor, head: torch.Tensor = None) -> torch.Tensor:
        return self.mlp(x0)


class DCNv2Tower(nn.Module):
    """DCN-v2, stacked: ``layers`` full-rank cross layers ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l``, then a
    deep MLP of ``layers`` ReLU layers on the crossed vector.

    Shapes: [B, W] -> [B, W]

    Example:
        >>> DCNv2Tower(8, 2)(torch.zeros(3, 8)).shape
        torch.Size([3, 8])
    """

    def __init__(self, width: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.deep = SharedBottomTower(width, layers, dropout)

    def forward(self, x0: torch.Tensor, head: torch.Tensor = None) -> torch.Tensor:
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.deep(x)


def _expert(width: int, dropout: float, dims: Sequence[int] = ()) -> nn.Sequential:
    """Linear layers of widths ``dims`` (default: two of ``width``), ReLU and dropout between, a LayerNorm."""
    dims = list(dims) or [width, width]
    mods: List[nn.Module] = []
    for i, (a, b) in enumerate(zip([width, *dims], dims)):
        mods += [nn.Linear(a, b)] + ([nn.ReLU(), nn.Dropout(dropout)] if i < len(dims) - 1 else [])
    return nn.Sequential(*mods, nn.LayerNorm(dims[-1]))


class MMoETower(nn.Module):
    """Multi-gate mixture of experts: E shared experts, one softmax gate per task over them.

    Shapes: x0 [B, W] -> [B, K, W'] (W' = ``dims[-1]``, or W)

    Example:
        >>> MMoETower(8, tasks=3, experts=4)(torch.zeros(2, 8)).shape
        torch.Size([2, 3, 8])
        >>> MMoETower(8, tasks=3, experts=4, dims=[16, 6])(torch.zeros(2, 8)).shape
        torch.Size([2, 3, 6])
    """

    def __init__(
        self, width: int, tasks: int, experts: int = 4, dropout: float = 0.0, dims: Sequence[int] = ()
    ):
        super().__init__()
        self.experts = nn.ModuleList(_expert(width, dropout, dims) for _ in range(experts))
        self.out_width = list(dims)[-1] if dims else width
        self.gates = nn.Linear(width, tasks * experts)
        self.tasks, self.n = tasks, experts

    def forward(self, x0: torch.Tensor, head: torch.Tensor = None) -> torch.Tensor:
        e = torch.stack([f(x0) for f in self.experts], dim=1)  # [B, E, W]
        g = self.gates(x0).view(-1, self.tasks, self.n).softmax(-1)  # [B, K, E]
        return torch.bmm(g, e)


class _CGC(nn.Module):
    """One customized gate control level: per-task experts plus shared experts; each task's gate mixes its
    own and the shared ones, and (below the top level) a shared gate mixes all of them for the next level."""

    def __init__(self, width: int, tasks: int, own: int, shared: int, last: bool, dropout: float):
        super().__init__()
        self.own = nn.ModuleList(
            nn.ModuleList(_expert(width, dropout) for _ in range(own)) for _ in range(tasks)
        )
        self.shared = nn.ModuleList(_expert(width, dropout) for _ in range(shared))
        self.task_gates = nn.ModuleList(nn.Linear(width, own + shared) for _ in range(tasks))
        self.shared_gate = None if last else nn.Linear(width, tasks * own + shared)

    def forward(self, xs: List[torch.Tensor], xshared: torch.Tensor):
        shared = [f(xshared) for f in self.shared]
        own = [[f(x) for f in experts] for x, experts in zip(xs, self.own)]
        out = []
        for x, mine, gate in zip(xs, own, self.task_gates):
            e = torch.stack(mine + shared, dim=1)
            out.append(torch.bmm(gate(x).softmax(-1).unsqueeze(1), e).squeeze(1))
        if self.shared_gate is None:
            return out, None
        e = torch.stack([f for mine in own for f in mine] + shared, dim=1)
        return out, torch.bmm(self.shared_gate(xshared).softmax(-1).unsqueeze(1), e).squeeze(1)


class PLETower(nn.Module):
    """Progressive layered extraction: ``levels`` stacked CGC levels.

    Shapes: x0 [B, W] -> [B, K, W]

    Example:
        >>> PLETower(8, tasks=3, levels=2)(torch.zeros(2, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(
        self, width: int, tasks: int, levels: int = 2, own: int = 1, shared: int = 2, dropout: float = 0.0
    ):
        super().__init__()
        self.levels = nn.ModuleList(
            _CGC(width, tasks, own, shared, last=i == levels - 1, dropout=dropout) for i in range(levels)
        )
        self.tasks = tasks

    def forward(self, x0: torch.Tensor, head: torch.Tensor = None) -> torch.Tensor:
        xs, xshared = [x0] * self.tasks, x0
        for level in self.levels:
            xs, xshared = level(xs, xshared)
        return torch.stack(xs, dim=1)


class TaskConditionedTower(nn.Module):
    """The cross tower with each block's input scaled by ``2 * sigmoid(g[task])``, a learned per-task,
    per-block vector (zero at start, so the tower begins as the shared one).

    Shapes: x0 [B, W], head [B] -> [B, W] (each row shaped by its own task)

    Example:
        >>> TaskConditionedTower(8, tasks=3, layers=2)(torch.zeros(2, 8), torch.tensor([0, 2])).shape
        torch.Size([2, 8])
    """

    def __init__(self, width: int, tasks: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(CrossBlock(width, dropout) for _ in range(layers))
        self.gates = nn.ModuleList(nn.Embedding(tasks, width) for _ in range(layers))
        for g in self.gates:
            nn.init.zeros_(g.weight)
        self.out_norm = nn.LayerNorm(width)

    def forward(self, x0: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        x = x0
        for block, gate in zip(self.blocks, self.gates):
            x = block(x0, x * 2 * torch.sigmoid(gate(head)))
        return self.out_norm(x)


def build_tower(
    kind: str,
    width: int,
    tasks: int,
    layers: int,
    experts: int,
    dropout: float,
    expert_dims: Sequence[int] = (),
) -> nn.Module:
    """The tower named by ``model.tower``; ``layers`` is blocks or layers (cross, mlp, dcn_v2,
    task_conditioned) or CGC levels (ple); ``expert_dims``: mmoe's expert widths. A tower whose output
    width is not ``width`` says so in ``out_width``."""
    if expert_dims and kind != "mmoe":
        raise ValueError(
            f"model.expert_dims={list(expert_dims)} shapes mmoe experts only, not model.tower={kind!r}"
        )
    if kind == "cross":
        return ResidualCrossTower(width, layers, dropout)
    if kind == "mlp":
        return SharedBottomTower(width, layers, dropout)
    if kind == "dcn_v2":
        return DCNv2Tower(width, layers, dropout)
    if kind == "mmoe":
        return MMoETower(width, tasks, experts, dropout, expert_dims)
    if kind == "ple":
        return PLETower(
            width, tasks, layers, own=max(1, experts // 4), shared=max(1, experts // 2), dropout=dropout
        )
    if kind == "task_conditioned":
        return TaskConditionedTower(width, tasks, layers, dropout)
    raise ValueError(f"model.tower={kind!r}: choose one of {list(TOWERS)}")
