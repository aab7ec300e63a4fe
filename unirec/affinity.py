"""Inter-task affinity and the grouping search: the measurements behind the consolidation advice.

Lookahead affinity (Fifty et al., NeurIPS 2021, "Efficiently Identifying Task Groupings for Multi-Task
Learning", TAG). At the shared parameters θs of a batch, task i's lookahead is one step on its own loss,
``θs' = θs − lr · d(∇θs L_i)``, with everything task-specific left as it is: a plain gradient step
(``d`` the identity), or the step the run's optimizer would take (the advisor preconditions by Adam's second
moments, see :func:`unirec.advise.adam_direction`). Its affinity onto task j is::

    Z[i, j] = Z_{i→j} = 1 − L_j(θs') / L_j(θs)

positive when task i's step lowers task j's loss, negative when it raises it. ``Z[j, j]`` is what task j's
own step does for it, so ``Z[i, j] / Z[j, j]`` (:func:`normalised`) reads "task i's step gives task j this
share of its own step's progress": the scale (the learning rate, how easy task j's loss is to lower)
cancels, so tasks compare with each other. The gradients' cosine at θs comes with no extra cost.

The grouping search (:func:`best_grouping`) tries every partition of the tasks (203 for 6 tasks) and keeps
the one with the largest total normalised affinity onto each task from the other members of its group: a
task alone (bespoke) receives nothing, a task whose group hurts it receives a negative amount.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

LossesAt = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
"""Parameter name -> replacement tensor (``{}``: the model's own) -> the [K] per-task losses of one batch
(NaN, or anything, for a task without rows there: it is read only where the task is present)."""

Direction = Callable[[str, torch.Tensor], torch.Tensor]
"""Parameter name, a task's (dense) gradient there -> the lookahead's update direction, stepped as
``θ − lr · direction``."""


@dataclass
class Lookahead:
    """One batch's measurement.

    Shapes (K tasks):
        affinity: [K, K], ``affinity[i, j] = Z_{i→j}``; NaN in the rows of tasks absent from the stepped
            batch and in the columns of tasks absent from what Z is read on (the batch, or the held-out
            rows).
        cosine: [K, K] cosine of the tasks' gradients at the shared parameters; NaN in the rows and columns
            of tasks absent from the stepped batch.
        present: [K] bool, the task had rows in the stepped batch.
        grads: parameter name -> [K, *shape] each task's gradient there (zeros for a task absent from the
            stepped batch), for the parameters named in ``keep``.
    """

    affinity: torch.Tensor
    cosine: torch.Tensor
    present: torch.Tensor
    grads: Dict[str, torch.Tensor] = field(default_factory=dict)


def lookahead(
    losses_at: LossesAt,
    shared: Mapping[str, torch.Tensor],
    lr: float,
    present: torch.Tensor,
    direction: Optional[Direction] = None,
    held_out: Optional[LossesAt] = None,
    keep: Sequence[str] = (),
) -> Lookahead:
    """Z_{i→j} and gradient cosines: a step for every task present in one batch, Z read on every task
    present there (or in ``held_out``).

    Args:
        losses_at: the batch's per-task losses with some parameters replaced (see :data:`LossesAt`).
        shared: the shared parameters by name; only these move in a lookahead.
        lr: lookahead step size.
        present: [K] bool, which tasks have rows in the batch (the others get NaN).
        direction: the update direction of a gradient (:data:`Direction`); None: the gradient itself.
            The cosines are always those of the raw gradients.
        held_out: the per-task losses Z is measured on, before and after each step, where they are not
            the stepped batch's own (TAG's): rows no step trains on, so Z reads how task i's step moves task
            j's *held-out* loss. Its tasks without rows (a NaN loss, as :data:`LossesAt` gives) get NaN
            columns.
        keep: names of shared parameters whose per-task gradients come back (:attr:`Lookahead.grads`),
            for measures beyond the step (:func:`alignment`); computed anyway, so free but for memory.

    Costs one forward with its graph, one backward per present task and one forward per present task
    (with ``held_out``, one more forward).

    Example (one shared weight w = 0.5; L_a = (w - 1)², L_b = (2w)²; lr 0.1: a's step moves w to 0.6)::

        >>> w = torch.tensor(0.5, requires_grad=True)
        >>> def losses_at(p):
        ...     v = p.get("w", w)
        ...     return torch.stack([(v - 1) ** 2, (2 * v) ** 2])
        >>> m = lookahead(losses_at, {"w": w}, 0.1, torch.tensor([True, True]))
        >>> [[round(z, 4) for z in row] for row in m.affinity.tolist()]
        [[0.36, -0.44], [-2.24, 0.96]]
        >>> m.cosine[0, 1].item()
        -1.0
    """
    names, params = list(shared), list(shared.values())
    losses = losses_at({})
    k = losses.shape[0]
    nan = torch.full((k, k), math.nan)
    affinity, flat = nan.clone(), []
    tasks = [i for i in range(k) if bool(present[i])]
    kept = {n: torch.zeros((k, *shared[n].shape), dtype=torch.float64) for n in keep}
    measure_on = held_out or losses_at
    with torch.no_grad():
        base = held_out({}) if held_out is not None else losses.detach()
    columns = tasks if held_out is None else [j for j in range(k) if float(base[j]) > 0]  # NaN: no rows
    for i in tasks:
        grads = torch.autograd.grad(losses[i], params, retain_graph=i != tasks[-1], allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
            for p, g in zip(params, grads)
        ]
        flat.append(torch.cat([g.reshape(-1) for g in grads]).double())
        for n in keep:
            kept[n][i] = grads[names.index(n)].detach().to("cpu", torch.float64)
        with torch.no_grad():
            step = grads if direction is None else [direction(n, g) for n, g in zip(names, grads)]
            moved = {n: p.detach() - lr * d for n, p, d in zip(names, params, step)}
            after = measure_on(moved)
        for j in columns:
            affinity[i, j] = float(1.0 - after[j] / base[j])
    cosine = nan.clone()
    if flat:
        unit = torch.nn.functional.normalize(torch.stack(flat), dim=1)
        idx = torch.tensor(tasks)
        cosine[idx.unsqueeze(1), idx.unsqueeze(0)] = (unit @ unit.T).float().cpu()
    return Lookahead(affinity, cosine, present.bool().cpu(), kept)


class AffinityLog:
    """Running sums of :class:`Lookahead` measurements over steps (NaN entries are not counted).

    Args:
        k: number of tasks K.
    """

    def __init__(self, k: int):
        self.z = torch.zeros(k, k, dtype=torch.float64)
        self.cos = torch.zeros(k, k, dtype=torch.float64)
        self.n = torch.zeros(k, k, dtype=torch.float64)
        self.n_cos = torch.zeros(k, k, dtype=torch.float64)
        """Counted apart from ``n``: with held-out rows, Z has columns for tasks the batch lacks."""
        self.steps: List[torch.Tensor] = []
        """Each measurement's affinity [K, K], for the spread of the per-task benefit."""
        self.grads: Dict[str, torch.Tensor] = {}
        """Parameter name -> [K, *shape] each task's gradient summed over the measured steps (the parameters
        a :class:`Lookahead` kept)."""

    def add(self, m: Lookahead) -> None:
        ok, ok_cos = ~torch.isnan(m.affinity), ~torch.isnan(m.cosine)
        self.z += torch.where(ok, m.affinity, 0.0).double()
        self.cos += torch.where(ok_cos, m.cosine, 0.0).double()
        self.n += ok.double()
        self.n_cos += ok_cos.double()
        self.steps.append(m.affinity.double())
        for n, g in m.grads.items():
            if n in self.grads:
                self.grads[n] += g
            else:
                self.grads[n] = g.clone()

    def mean_affinity(self) -> torch.Tensor:
        """[K, K] Z averaged over the steps where both tasks were present (NaN where never)."""
        return self.z / self.n.where(self.n > 0, math.nan)

    def mean_cosine(self) -> torch.Tensor:
        """[K, K] gradient cosine averaged over the steps where both tasks were in the batch."""
        return self.cos / self.n_cos.where(self.n_cos > 0, math.nan)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., ICML 2019) of two [n, d] matrices whose rows
    correspond: ``||XᵀY||² / (||XᵀX|| ||YᵀY||)`` (Frobenius norms) after centring each column. 1 when one
    is a rotation and scaling of the other, near 0 when their rows vary independently; NaN when either is
    constant.

        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
        >>> round(linear_cka(x, x @ torch.tensor([[0.0, -2.0], [2.0, 0.0]])), 6)
        1.0
    """
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(torch.linalg.matrix_norm(x.T @ y) ** 2 / den) if den > 0 else math.nan


def alignment(grads: torch.Tensor) -> torch.Tensor:
    """[K, K] :func:`linear_cka` of the tasks' summed gradients at one embedding table ([K, rows, d], from
    :attr:`AffinityLog.grads`), over the rows both tasks' gradients touched (NaN where there are no more
    of them than the d columns: with n <= d rows the centred matrices have rank below d and CKA is biased
    upwards, to exactly 1 at n = 2; it stays biased by about d / n beyond, so values compare only between
    tables of like size and width).

    Whether the tasks' updates of the shared rows have the same structure: high when the way task i's
    update varies from row to row is, up to an orthogonal map of the d columns, task j's; near 0 when one
    task's update of a row says nothing of the other's. Orthogonal maps include reflections, so two tasks
    that push every shared row in opposite directions also score 1: it is not a measure of agreement
    (the gradient cosine is). The diagonal is 1."""
    k, d = grads.shape[0], math.prod(grads.shape[2:])
    touched = grads.flatten(2).abs().sum(-1) > 0  # [K, rows]
    out = torch.full((k, k), math.nan, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            rows = touched[i] & touched[j]
            if int(rows.sum()) > d:
                out[i, j] = out[j, i] = linear_cka(grads[i][rows].flatten(1), grads[j][rows].flatten(1))
    return out


def normalised(z: torch.Tensor) -> torch.Tensor:
    """[K, K] ``Z[i, j] / Z[j, j]``: task i's effect on task j as a share of task j's own step.

    A task whose own step did not lower its loss (``Z[j, j] <= 0``: a lookahead step too large, or too few
    measurements) has no scale to compare with: its column is NaN.

    >>> normalised(torch.tensor([[0.2, 0.1], [-0.1, 0.4]])).tolist()
    [[1.0, 0.25], [-0.5, 1.0]]
    """
    own = torch.diagonal(z)
    return z / own.where(own > 0, math.nan).unsqueeze(0)


def benefit(z_steps: Sequence[torch.Tensor], z_mean: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each task's predicted benefit of sharing one model with all the others, and its standard error.

    ``benefit[j] = sum_{i != j} Z[i, j] / Z[j, j]`` on the step-averaged Z (the first-order gain of a joint
    step over task j's own step). The standard error is that of the mean over steps of the per-step sum,
    each step divided by the same averaged ``Z[j, j]``.

    Shapes: z_steps: S tensors [K, K]; z_mean: [K, K] -> ([K], [K]).
    """
    own = torch.diagonal(z_mean)
    own = own.where(own > 0, math.nan)
    off = ~torch.eye(z_mean.shape[0], dtype=torch.bool)
    stacked = torch.stack(list(z_steps)) if z_steps else z_mean.unsqueeze(0)
    per_step = torch.where(off, stacked, 0.0).nansum(dim=1) / own  # [S, K]
    mean = torch.where(off, z_mean, 0.0).nansum(dim=0) / own
    s = per_step.shape[0]
    stderr = per_step.std(dim=0, unbiased=True) / math.sqrt(s) if s > 1 else torch.full_like(mean, math.nan)
    return mean, stderr


# -------------------------------------------------------------------------------------------- grouping


def partitions(items: Sequence[str]) -> Iterator[List[List[str]]]:
    """Every partition of ``items`` into non-empty groups, each once (Bell(n) of them).

    >>> [p for p in partitions(["a", "b", "c"])]
    [[['a', 'b', 'c']], [['a'], ['b', 'c']], [['a', 'b'], ['c']], [['b'], ['a', 'c']], [['a'], ['b'], ['c']]]
    """
    if not items:
        yield []
        return
    first, rest = items[0], list(items[1:])
    for sub in partitions(rest):
        for n in range(len(sub)):  # the first item joins one of the groups of a partition of the rest
            yield sub[:n] + [[first, *sub[n]]] + sub[n + 1 :]
        yield [[first], *sub]


def onto(groups: Sequence[Sequence[str]], a: Mapping[str, Mapping[str, float]]) -> Dict[str, float]:
    """Task -> total normalised affinity onto it from the other members of its group (``a[i][j]``: i onto j)."""
    return {j: sum(a[i][j] for i in g if i != j) for g in groups for j in g}


@dataclass
class Grouping:
    """The outcome of :func:`best_grouping`."""

    groups: List[List[str]]
    """Tasks that share one model; a group of one stays bespoke."""
    score: float
    """Total normalised affinity onto each task from its group (0 for every task bespoke)."""
    onto: Dict[str, float]
    """Each task's share of the score."""
    searched: int
    """Partitions compared."""


def best_grouping(a: Mapping[str, Mapping[str, float]], max_tasks: int = 6) -> Grouping:
    """The partition of the tasks that maximises the total normalised affinity onto each task from its group.

    Ties (within 1e-9) go to fewer groups (fewer models to host), then to the first in enumeration order.
    A pair whose affinity is unknown (NaN) counts as 0.

    Args:
        a: task i -> task j -> normalised affinity of i onto j (every ordered pair).
        max_tasks: the search is exhaustive; more tasks than this is an error (``advise.max_group_tasks``).

    >>> a = {"x": {"x": 1, "y": 0.5, "z": -0.2}, "y": {"x": 0.4, "y": 1, "z": -0.1}, "z": {"x": 0.1, "y": 0.0, "z": 1}}
    >>> g = best_grouping(a)
    >>> g.groups, round(g.score, 4), g.searched
    ([['x', 'y'], ['z']], 0.9, 5)
    """
    names = list(a)
    if len(names) > max_tasks:
        raise ValueError(
            f"the grouping search is exhaustive and takes at most advise.max_group_tasks={max_tasks} tasks, "
            f"got {len(names)} ({names}); advise a subset with task=[...] or raise advise.max_group_tasks"
        )
    clean = {i: {j: (0.0 if math.isnan(v) else float(v)) for j, v in row.items()} for i, row in a.items()}
    best, best_key, searched = None, None, 0
    for p in partitions(names):
        searched += 1
        per = onto(p, clean)
        key = (round(sum(per.values()), 9), -len(p))
        if best_key is None or key > best_key:
            best, best_key = (p, per), key
    groups, per = best
    return Grouping(groups, sum(per.values()), per, searched)
