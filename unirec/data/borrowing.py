"""Borrowed rows: a task's head also trains on other tasks' train rows, posed as its own requests.

One trainer sees every canvas's logs, so the ``home`` head can also learn from what a user engaged with on
the search or genre pages, which a bespoke home job never sees. ``task.<name>.borrow`` names the lending
tasks. In every training batch (:class:`unirec.data.loader.MixedLoader` makes the copies in its prefetch
thread) each lender's rows are copied as rows of the borrower: the fields of the
borrower's context keep their values, every other field takes its sentinel with presence 0, as it would
in one of the borrower's own requests. The copies keep their labels, weights and request ids (so a copy's
own other positives are never its negatives), and they train only the borrower's head.

Only training sees copies: validation, evaluation and serving rank the borrower's own requests.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Mapping, Sequence

import torch

from unirec.data.batch import Batch
from unirec.schema import FeatureSpec

log = logging.getLogger(__name__)


class Borrowing:
    """Appends to a batch the lenders' rows as rows of their borrowers.

    Args:
        spec: the fitted feature spec (tasks, their contexts and candidate types).
        borrow: borrower task -> the tasks it borrows from (``task.<name>.borrow``).

    Shapes: a batch of B rows, F context fields -> a batch of B + (lent rows) rows.

    Example:
        >>> from unirec.schema import FeatureSpec, FieldSpec, TaskSpec, CandidateSpec, TableSpec
        >>> spec = FeatureSpec(
        ...     context={"user": FieldSpec("user", "categorical", table="user"),
        ...              "query": FieldSpec("query", "categorical", table="query")},
        ...     candidates={"item": CandidateSpec("item", "items.parquet", "item_id", "item", ("item",))},
        ...     candidate_fields={"item": FieldSpec("item", "categorical", table="item", column="item_id")},
        ...     tasks={"home": TaskSpec("home", 0, "item", ("user",)),
        ...            "search": TaskSpec("search", 2, "item", ("query", "user"))},
        ...     tables={"user": TableSpec("user", 5), "query": TableSpec("query", 5), "item": TableSpec("item", 7)})
        >>> one = lambda *v: torch.tensor(v)
        >>> b = Batch({"query": one(0, 3), "user": one(1, 2)}, torch.tensor([[1., 0.], [1., 1.]]),
        ...           {"item": one(4, 5)}, one(0, 2), one(1, 1), one(1., 1.), one(10, 11))
        >>> out = Borrowing(spec, {"home": ["search"]})(b)
        >>> out.task_type.tolist(), out.context["query"].tolist(), out.present[2].tolist()  # user, query
        ([0, 2, 0], [0, 3, 0], [1.0, 0.0])
    """

    def __init__(self, spec: FeatureSpec, borrow: Mapping[str, Sequence[str]]):
        fields = list(spec.context)
        self.pairs = []  # (lender task_type, borrower task_type, the borrower's fields, their mask [F])
        for borrower, lenders in borrow.items():
            if not lenders:
                continue
            if borrower not in spec.tasks:
                continue  # a task this run does not train borrows nothing
            mine = spec.tasks[borrower]
            for lender in lenders:
                key = f"task.{borrower}.borrow"
                if lender == borrower:
                    raise ValueError(f"{key} names {borrower} itself; list other tasks")
                if lender not in spec.tasks:
                    log.warning("%s: %s is not trained in this run; nothing borrowed from it", key, lender)
                    continue
                theirs = spec.tasks[lender]
                if theirs.candidate != mine.candidate:
                    raise ValueError(
                        f"{key}: {lender} ranks {theirs.candidate!r} candidates, {borrower} ranks "
                        f"{mine.candidate!r}; only tasks that rank the same type can lend rows"
                    )
                shared = set(theirs.fields) & set(mine.fields)
                if not shared:
                    raise ValueError(
                        f"{key}: {lender}'s context {sorted(theirs.fields)} shares no field with "
                        f"{borrower}'s {sorted(mine.fields)}; its rows would be requests with no context"
                    )
                keep = torch.tensor([f in mine.fields for f in fields], dtype=torch.bool)
                self.pairs.append((theirs.id, mine.id, set(mine.fields), keep))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def __call__(self, batch: Batch) -> Batch:
        """The batch with every lender's rows appended as its borrowers' rows (the batch itself without any)."""
        parts = [batch]
        for lender, borrower, kept, keep in self.pairs:
            lent = batch.select(batch.task_type == lender)
            if len(lent) == 0:
                continue
            context = {f: t if f in kept else torch.zeros_like(t) for f, t in lent.context.items()}
            present = lent.present * keep.to(lent.present.device, lent.present.dtype)
            task_type = torch.full_like(lent.task_type, borrower)
            parts.append(replace(lent, context=context, present=present, task_type=task_type))
        return batch if len(parts) == 1 else Batch.cat(parts)
