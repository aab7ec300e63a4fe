"""Borrowed rows: a lender's train rows posed as the borrower's requests, and what a step makes of them."""

from __future__ import annotations

import logging

import pytest
import torch

from unirec.config import compose
from unirec.data.borrowing import Borrowing
from unirec.train import setup, train_step


@pytest.fixture(scope="module")
def toy(toy_features):
    tr = setup(compose(["debug=toy", "loader.prefetch=0", "loader.batch_size=256"]), toy_features)
    return tr.spec, tr.loader.next_batch()


def test_lent_rows_are_posed_as_the_borrowers_requests(toy):
    spec, batch = toy
    home, search = spec.tasks["home"], spec.tasks["search"]
    out = Borrowing(spec, {"home": ["search"]})(batch)
    lent = batch.task_type == search.id
    n, extra = len(batch.task_type), int(lent.sum())
    assert extra > 0 and len(out.task_type) == n + extra
    # The batch itself comes first, untouched.
    assert torch.equal(out.task_type[:n], batch.task_type) and torch.equal(out.present[:n], batch.present)
    copy = out.select(torch.arange(n, n + extra))
    orig = batch.select(lent)
    assert (copy.task_type == home.id).all()
    for a in ("label", "weight", "request_id"):
        assert torch.equal(getattr(copy, a), getattr(orig, a)), a
    for f, t in orig.candidate.items():
        assert torch.equal(copy.candidate[f], t), f
    fields = list(spec.context)
    for i, f in enumerate(fields):
        if f in home.fields:  # user, history (and home's own fields, absent in a search row anyway)
            assert torch.equal(copy.context[f], orig.context[f]), f
            assert torch.equal(copy.present[:, i], orig.present[:, i]), f
        else:  # search's query (and every field neither has) is cleared, as in a home request
            assert not copy.context[f].any() and not copy.present[:, i].any(), f
    # Search rows carry a query and a user, so the test above saw both cases.
    assert orig.present[:, fields.index("query")].any() and orig.present[:, fields.index("user")].any()


def test_a_step_trains_the_borrowers_head_on_lent_rows_only_when_asked(toy_features, toy):
    spec, batch = toy
    only_search = batch.select(batch.task_type == spec.tasks["search"].id)
    home = spec.tasks["home"].id
    counts = {}
    for borrow in ("[]", "[search]"):
        cfg = compose(["debug=toy", "loader.prefetch=0", f"task.home.borrow={borrow}"])
        tr = setup(cfg, toy_features)
        head = tr.module.task_names.index("home")
        # The loader appends the copies to every batch it makes; here to a batch made by hand.
        result = train_step(tr, tr.loader.borrowing(only_search))
        counts[borrow] = result.counts[head].item()
        # The loader's own batches carry the copies beyond its batch size.
        assert (len(tr.loader.next_batch()) > cfg.loader.batch_size) == (borrow != "[]"), borrow
        assert result.stepped
        # Every head runs on every row; only the rows of its own task put a gradient into it.
        grad = tr.module.heads.heads["home"][0].weight.grad
        assert (grad.abs().sum() > 0).item() == (borrow != "[]"), borrow
    assert counts["[]"] == 0
    assert counts["[search]"] == int((only_search.task_type != home).sum())


@pytest.mark.parametrize(
    "borrow, message",
    [
        ({"home": ["home"]}, "task.home.borrow names home itself"),
        ({"home": ["genre_rows"]}, "genre_rows ranks 'genre' candidates"),
        ({"related": ["genre"]}, "task.related.borrow: genre's context .* shares no field"),
    ],
)
def test_a_lender_that_cannot_lend_is_refused_naming_the_key(toy, borrow, message):
    spec, _ = toy
    with pytest.raises(ValueError, match=message):
        Borrowing(spec, borrow)


def test_a_lender_the_run_does_not_train_is_skipped_and_logged(toy, caplog):
    spec, batch = toy
    with caplog.at_level(logging.WARNING, logger="unirec.data.borrowing"):
        borrowing = Borrowing(spec, {"home": ["checkout"]})
    assert not borrowing and borrowing(batch) is batch
    assert "task.home.borrow: checkout is not trained in this run" in caplog.text
