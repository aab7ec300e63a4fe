"""The item-transition prior: what followed the request's recent items, added to the logit of a task.

A request's history (an ordered field, oldest first) and a candidate that read the same embedding table
get the term ``w_k * log(1 + s)`` in the logit of task k, where ``s`` sums, over the request's ``recent``
latest history items (weight 1/j for the j-th latest), how often the candidate came within ``window``
events after that item in the users' train engagements (weight 1/distance): the counts of the
``transitions`` baseline of :mod:`unirec.baselines`, as a fixed table inside the model, and ``w_k`` one
learned weight per task (0 for a task whose context has no such history).

The counts are a buffer [T, T] over the table's rows, filled once from the train split before training
(:func:`unirec.baselines.transition_table`); they travel in every checkpoint and in the exported weights,
so training, evaluation and serving add the same term. The table is dense: ``max_rows`` bounds it.

Fitting the weights (``model.transitions_fit``): ``valid``, the default, trains the network without the
prior and, at every validation, sets each weight to the value of a small grid that ranks the valid split
best (:func:`unirec.validation.calibrate_transitions`); ``learned`` trains the weights with the network.

Leave-one-out (``learned``): the counts include every train event, so a training row's own positive would find its own
transition counted (1/j from the j-th latest history item); in training mode that share is taken out of
the own-candidate prior of every positive row (target encoding's leave-one-out), or the learned weights
would trust counts that the test split never has. It assumes the history is the counted engagements
in order (MovieLens: both are every rating); where the history holds other events (the synthetic
canvases' clicks of canvases without a user), the share taken out is approximate.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Dict, Optional, Sequence

import torch
from torch import nn

from unirec.kinds import FIRST_ID, kind_of

if TYPE_CHECKING:
    from unirec.config import ModelConfig
    from unirec.schema import FeatureSpec

log = logging.getLogger("unirec.model")

FITS = ("valid", "learned")
"""How the weights are fitted (``model.transitions_fit``)."""

PRIOR = "~transitions"
"""The key of the prior's per-request rows in a model's memory (:meth:`MultiTaskRanker.context_memory`)."""


class TransitionPrior(nn.Module):
    """Transition counts [T, T] and one weight per task head.

    Args:
        rows: T, the rows of the shared table (history and candidate ids).
        field: the context field of the history (ids of that table, oldest first, left-padded).
        id_field: the candidate field of the candidate id (a row of that table).
        uses: per head, whether its task's context has ``field``.
        window, recent: see the module doc; ``window`` is the one the counts were built with.

    Example:
        >>> p = TransitionPrior(4, "history", "item", [True, False], window=1, recent=2)
        >>> p.counts[2, 3] = 3.0  # item row 3 followed item row 2 three times
        >>> rows = p.request_rows({"history": torch.tensor([[0, 2]])})  # one request, history [2]
        >>> round(float(rows[0, 3]), 4), round(float(rows[0, 2]), 4)  # log(1 + 3), log(1 + 0)
        (1.3863, 0.0)
        >>> p.logits(rows, torch.tensor([3, 2]), torch.tensor([0])).tolist()  # weight 1 at init
        [[1.3862943649291992, 0.0]]
    """

    def __init__(
        self,
        rows: int,
        field: str,
        id_field: str,
        uses: Sequence[bool],
        window: int,
        recent: int,
        fit: str = "learned",
    ):
        super().__init__()
        self.field, self.id_field, self.window, self.recent = field, id_field, window, recent
        if fit not in FITS:
            raise ValueError(f"model.transitions_fit must be one of {FITS}, got {fit!r}")
        self.fit = fit
        self.register_buffer("counts", torch.zeros(rows, rows))
        # learned: 1 at the start, trained with the network; valid: 0 until a validation sets it.
        self.weight = nn.Parameter(torch.full((len(uses),), 1.0 if fit == "learned" else 0.0))
        self.weight.requires_grad_(fit == "learned")
        self.register_buffer("uses", torch.tensor(uses, dtype=torch.float32), persistent=False)
        # The j-th latest history item votes with weight 1/j; [recent], oldest position first.
        self.register_buffer(
            "votes", 1.0 / torch.arange(recent, 0, -1, dtype=torch.float32), persistent=False
        )

    @property
    def in_training(self) -> bool:
        """Whether the training forward adds the prior (only when the weights are learned with it)."""
        return self.fit == "learned"

    def _history(self, context: Dict[str, torch.Tensor]) -> torch.Tensor:
        return context[self.field][:, -self.recent :]

    def request_rows(self, context: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Requests' context fields -> [R, T] ``log(1 + s)`` of every table row as their candidate."""
        hist = self._history(context)
        votes = self.votes[-hist.shape[1] :]
        s = torch.zeros(hist.shape[0], self.counts.shape[0], device=hist.device)
        for j in range(hist.shape[1]):  # one [R, T] gather a position: never [R, m, T] at once
            s = s + votes[j] * self.counts[hist[:, j]]
        return torch.log1p(s)

    def coefficient(self, head: torch.Tensor) -> torch.Tensor:
        """[M] the learned weight of each row's head, 0 for heads without the history."""
        return (self.weight * self.uses)[head]

    def logits(self, rows: torch.Tensor, ids: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Requests' :meth:`request_rows` [R, T], candidate table rows [N] (the same for every request) or
        [R, N], heads [R] -> the prior's term of the logits [R, N]."""
        picked = rows[:, ids] if ids.dim() == 1 else rows.gather(1, ids)
        return self.coefficient(head).unsqueeze(1) * picked

    def own(
        self,
        context: Dict[str, torch.Tensor],
        ids: torch.Tensor,
        leave_out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Each row's prior for its own candidate, ``log(1 + s)`` [B]; ``leave_out`` [B] (bool): rows
        whose own transition is in the counts, taken out (1/j from the j-th latest item within window)."""
        hist = self._history(context)
        m = hist.shape[1]
        votes = self.votes[-m:]
        s = torch.zeros(ids.shape[0], device=ids.device)
        for j in range(m):
            c = self.counts[hist[:, j], ids]
            distance = m - j  # the latest position is 1 event before the row's own
            if leave_out is not None and distance <= self.window:
                mine = leave_out & (hist[:, j] >= FIRST_ID)
                c = torch.where(mine, (c - 1.0 / distance).clamp_min(0.0), c)
            s = s + votes[j] * c
        return torch.log1p(s)


def build_prior(spec: FeatureSpec, cfg: ModelConfig, names: Sequence[str]) -> Optional[TransitionPrior]:
    """The prior over the table shared by an ordered context field (the history) and a task's candidate
    ids; the tasks whose context has that field use it. None (with a warning) when no task has one."""
    for name in names:
        ts = spec.tasks[name]
        id_field = spec.candidates[ts.candidate].id_field
        table = spec.candidate_fields[id_field].table
        for f in ts.fields:
            if kind_of(spec.context[f]).ordered and spec.context[f].table == table:
                rows = spec.tables[table].size
                if rows > cfg.transitions_max_rows:
                    raise ValueError(
                        f"model.transitions: table {table!r} has {rows} rows, over "
                        f"model.transitions_max_rows={cfg.transitions_max_rows} (its counts are a dense "
                        "[rows, rows] float table)"
                    )
                uses = [
                    f in spec.tasks[t].fields
                    and spec.candidates[spec.tasks[t].candidate].id_field == id_field
                    for t in names
                ]
                return TransitionPrior(
                    rows,
                    f,
                    id_field,
                    uses,
                    cfg.transitions_window,
                    cfg.transitions_recent,
                    cfg.transitions_fit,
                )
    # A model of tasks without a history (a bespoke related-items model of a grid that sets the prior for
    # every model) ranks as it would without the setting; said once, not an error.
    log.warning(
        "model.transitions: no task of %s has an ordered field (a history) over its candidates' id "
        "table; the model has no transition prior",
        list(names),
    )
    return None
