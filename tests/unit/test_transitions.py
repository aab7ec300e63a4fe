"""The transition prior inside the model: its term, leave-one-out in training, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from unirec.config import ModelConfig
from unirec.model import MultiTaskRanker
from unirec.model.transitions import TransitionPrior
from unirec.schema import CandidateSpec, FeatureSpec, FieldSpec, TableSpec, TaskSpec


def _spec(with_history: bool = True, items: int = 12) -> FeatureSpec:
    context = {"user": FieldSpec("user", "categorical", table="user")}
    if with_history:
        context["history"] = FieldSpec("history", "sequence", table="item", max_len=4)
    return FeatureSpec(
        context=context,
        candidates={"item": CandidateSpec("item", "items.parquet", "item_id", "item", ("item",))},
        candidate_fields={"item": FieldSpec("item", "categorical", table="item", column="item_id")},
        tasks={
            "a": TaskSpec("a", 0, "item", ("history", "user") if with_history else ("user",)),
            "b": TaskSpec("b", 1, "item", ("user",)),
        },
        tables={"user": TableSpec("user", 6), "item": TableSpec("item", items)},
    )


def test_leave_one_out_takes_a_positive_rows_own_transition_out():
    """Counts 1 from item 5 to item 7 at distance 1 and 0.5 from item 4 to 7 at distance 2: a positive
    row with history [4, 5] scoring 7 finds exactly its own event counted, so training sees 0."""
    p = TransitionPrior(10, "history", "item", [True], window=2, recent=3)
    p.counts[5, 7], p.counts[4, 7] = 1.0, 0.5
    ctx = {"history": torch.tensor([[0, 4, 5], [0, 4, 5]])}
    ids = torch.tensor([7, 7])
    want = math.log1p(1.0 * 1.0 + 0.5 * 0.5)  # latest votes 1, the one before 1/2
    assert p.own(ctx, ids).tolist() == pytest.approx([want, want])
    held = p.own(ctx, ids, leave_out=torch.tensor([True, False]))
    assert held.tolist() == pytest.approx([0.0, want])
    # Beyond the window a position's count holds no own event: nothing taken out there.
    p.counts[3, 7] = 0.25
    far = p.own({"history": torch.tensor([[3, 4, 5]])}, torch.tensor([7]), torch.tensor([True]))
    assert far.tolist() == pytest.approx([math.log1p(0.25 / 3)])


def test_rows_and_own_agree_and_the_head_without_history_gets_nothing():
    spec = _spec()
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, hidden_dim=8, transitions=True, transitions_fit="learned")
    m = MultiTaskRanker(spec, cfg).eval()
    m.transitions.counts.copy_(torch.rand(12, 12) * (torch.rand(12, 12) < 0.3) * 5)
    ctx = {"user": torch.tensor([1, 2]), "history": torch.tensor([[0, 0, 3, 4], [2, 5, 6, 7]])}
    present = torch.ones(2, 2)
    items = torch.arange(2, 12)
    for task in (0, 1):
        tt = torch.tensor([task, task])
        c, memory = m.encode_request(ctx, present, tt)
        with_prior = m.score_matrix(c, m.encode_candidates({"item": items}), tt, memory, items)
        prior = m.prior_logits(memory, items, m.head_index(tt))
        if task == 1:
            assert prior is None  # task b's context has no history
            continue
        own = torch.stack([m.transitions.own(ctx, items[k].expand(2)) for k in range(len(items))], 1)
        torch.testing.assert_close(prior, own)  # weight 1 at init
        assert prior.abs().sum() > 0
        with pytest.raises(ValueError, match="ids"):
            m.score_matrix(c, m.encode_candidates({"item": items}), tt, memory)
        del with_prior


def test_a_model_without_a_history_has_no_prior_and_a_huge_table_is_refused_by_name(caplog):
    plain = MultiTaskRanker(
        _spec(with_history=False), ModelConfig(embedding_dim=4, hidden_dim=8, transitions=True)
    )
    assert plain.transitions is None and "no transition prior" in caplog.text
    cfg = ModelConfig(embedding_dim=4, hidden_dim=8, transitions=True, transitions_max_rows=10)
    with pytest.raises(ValueError, match="transitions_max_rows=10"):
        MultiTaskRanker(_spec(), cfg)
