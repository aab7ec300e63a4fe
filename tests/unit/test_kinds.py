"""Field kinds: the sequence kind's encoding, pooling parity, and a kind defined here alone that trains."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from unirec.config import ModelConfig, compose
from unirec.kinds import (
    FIRST_ID,
    KINDS,
    OOV,
    SENTINEL,
    Categorical,
    EmbeddingOptions,
    kind_of,
    register,
    vocabulary_lookup,
)
from unirec.model import MultiTaskRanker, ranker
from unirec.model.pooling import SEQUENCE_POOLINGS, TargetAttention
from unirec.schema import CandidateSpec, FeatureSpec, FieldSpec, TableSpec, TaskSpec


def test_sequence_keeps_the_most_recent_right_aligned():
    f = FieldSpec("history", "sequence", table="item", max_len=3)
    lookup = vocabulary_lookup(pa.array(["a", "b", "c", "d"]), 0)
    col = pa.array([["a", "b", "c", "d"], ["zz"], [], None, ["d"]], pa.list_(pa.string()))
    values, present = kind_of(f).encode(f, col, lookup)
    a, b, c, d = range(FIRST_ID, FIRST_ID + 4)
    assert values.to_pylist() == [[b, c, d], [0, 0, OOV], [0, 0, 0], [0, 0, 0], [0, 0, d]]
    assert present.to_pylist() == [1, 1, 0, 0, 1]
    assert kind_of(f).sentinels(f, 2).to_pylist() == [[SENTINEL] * 3] * 2


def _spec(max_len: int = 4) -> FeatureSpec:
    return FeatureSpec(
        context={
            "history": FieldSpec("history", "sequence", table="item", max_len=max_len),
            "user": FieldSpec("user", "categorical", table="user"),
        },
        candidates={"item": CandidateSpec("item", "items.parquet", "item_id", "item", ("item",))},
        candidate_fields={"item": FieldSpec("item", "categorical", table="item", column="item_id")},
        tasks={"a": TaskSpec("a", 0, "item", ("history", "user")), "b": TaskSpec("b", 1, "item", ("user",))},
        tables={"user": TableSpec("user", 6), "item": TableSpec("item", 12)},
    )


@pytest.mark.parametrize("block", [1, 4096])
@pytest.mark.parametrize("pooling", list(SEQUENCE_POOLINGS))
def test_each_pooling_scores_a_catalogue_as_the_row_forward_does(pooling, block, monkeypatch):
    """score_matrix (context and history encoded once per request, N candidates batched) == the training
    forward on (request, candidate) rows, for every pooling, whether the requests go through in one block
    or one by one (``BLOCK_PAIRS``); an empty history is the missing vector."""
    monkeypatch.setattr(ranker, "BLOCK_PAIRS", block)
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, hidden_dim=16, sequence_pooling=pooling, sequence_layers=2)
    m = MultiTaskRanker(_spec(), cfg).eval()
    # one item table, read by the history and by the candidate id alike
    assert [
        n for n, x in m.named_modules() if isinstance(x, torch.nn.Embedding) and x.num_embeddings == 12
    ] == ["tables.item"]
    hist = torch.tensor([[0, 3, 4, 5], [0, 0, 0, 7], [0, 0, 0, 0]])
    ctx = {"history": hist, "user": torch.tensor([2, 3, 4])}
    present = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    tt = torch.tensor([0, 0, 1])
    items = torch.arange(2, 12)
    with torch.inference_mode():
        c = m.encode_context(ctx, present, tt)
        v = m.encode_candidates({"item": items})
        matrix = m.score_matrix(c, v, tt, m.context_memory(ctx, present))
        for r in range(3):
            one = m.score_vectors(c[r : r + 1], v, tt[r : r + 1], m.context_memory(
                {k: x[r : r + 1] for k, x in ctx.items()}, present[r : r + 1]))  # fmt: skip
            torch.testing.assert_close(one, matrix[r], rtol=0, atol=1e-5)
            rows = _rows(ctx, present, tt, items, r)
            torch.testing.assert_close(m(rows), matrix[r], rtol=0, atol=1e-5)


def test_attention_keys_from_the_projected_table_equal_the_projected_slots():
    """With more history slots in the batch than rows in the table, TargetAttention projects the table's
    rows once and looks the keys up: the same keys, and the same gradients for every parameter, as
    projecting each slot (which it still does for a batch smaller than the table, e.g. one request)."""
    torch.manual_seed(0)
    att = TargetAttention(4, EmbeddingOptions(8, 16, "attention", 1, 1, 0.0))
    table = torch.nn.Embedding(5, 8)
    seen = []
    att.key.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    x = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]])  # 8 slots, 5 table rows
    _, k, _ = att.memory(x, table)
    assert seen == [(4, 8)]  # the key ran on the recency rows only, not on the [2, 4, 8] slots
    want = att.key(table(x) + att.recency)
    torch.testing.assert_close(k, want)
    w = torch.randn_like(want)
    params = [table.weight, att.key.weight, att.key.bias, att.recency]
    got = torch.autograd.grad((k * w).sum(), params)
    for g, h in zip(got, torch.autograd.grad((want * w).sum(), params)):
        torch.testing.assert_close(g, h)
    seen.clear()
    att.memory(x[:1], table)  # 4 slots < 5 rows: each slot projected
    assert seen == [(1, 4, 8)]


def _rows(ctx, present, tt, items, r):
    from unirec.data.batch import Batch

    n = len(items)
    return Batch(
        {k: x[r : r + 1].expand(n, *x.shape[1:]) for k, x in ctx.items()},
        present[r : r + 1].expand(n, -1),
        {"item": items},
        tt[r : r + 1].expand(n),
        torch.zeros(n),
        torch.ones(n),
        torch.zeros(n, dtype=torch.long),
    )


@pytest.mark.parametrize("pooling", list(SEQUENCE_POOLINGS))
def test_the_history_changes_the_scores_and_padding_does_not(pooling):
    torch.manual_seed(1)
    m = MultiTaskRanker(_spec(), ModelConfig(embedding_dim=8, hidden_dim=16, sequence_pooling=pooling)).eval()
    v = m.encode_candidates({"item": torch.arange(2, 12)})

    def scores(h):
        ctx = {"history": torch.tensor([h]), "user": torch.tensor([2])}
        present = torch.tensor([[float(any(h)), 1.0]])
        c = m.encode_context(ctx, present, torch.tensor([0]))
        return m.score_vectors(c, v, torch.tensor([0]), m.context_memory(ctx, present))

    with torch.inference_mode():
        a, b = scores([0, 0, 3, 4]), scores([0, 0, 8, 9])
    assert (a - b).abs().max() > 1e-4
    # a longer max_len only adds padding positions in front: the same scores, once the wider model holds
    # the same weights, its per-position vectors aligned on the newest event (the sequence is right-aligned)
    wide = MultiTaskRanker(_spec(6), ModelConfig(embedding_dim=8, hidden_dim=16, sequence_pooling=pooling))
    state = m.state_dict()
    for name, t in wide.state_dict().items():
        if t.shape != state[name].shape:  # [max_len, D] per-position vectors: the newest rows line up
            state[name] = torch.cat([t[: t.shape[0] - state[name].shape[0]], state[name]])
    wide.load_state_dict(state)
    wide.eval()
    ctx = {"history": torch.tensor([[0, 0, 0, 0, 3, 4]]), "user": torch.tensor([2])}
    present = torch.tensor([[1.0, 1.0]])
    with torch.inference_mode():
        c = wide.encode_context(ctx, present, torch.tensor([0]))
        got = wide.score_vectors(c, wide.encode_candidates({"item": torch.arange(2, 12)}), torch.tensor([0]),
                                 wide.context_memory(ctx, present))  # fmt: skip
    torch.testing.assert_close(got, a, rtol=0, atol=1e-6)


class FirstLetter(Categorical):
    """A toy kind, known to this file alone: a text field embedded by its first letter only."""

    name = "first_letter"

    def vocabulary_values(self, col):
        return pc.utf8_slice_codeunits(pc.cast(col, pa.string()), 0, 1)

    def encode(self, f, col, lookup):
        return super().encode(f, pc.utf8_slice_codeunits(pc.cast(col, pa.string()), 0, 1), lookup)


@pytest.fixture
def first_letter():
    register(FirstLetter)
    yield KINDS["first_letter"]
    del KINDS["first_letter"]


def test_a_kind_defined_in_this_file_alone_prepares_and_trains(first_letter, tmp_path):
    import pyarrow.parquet as pq

    from unirec.data.features import Featurizer
    from unirec.data.prepare import prepare
    from unirec.train import run

    cfg = compose(["debug=toy", f"data.cache_dir={tmp_path / 'cache'}", "task=[home]",
                   "task.home.context.user.kind=first_letter", "trainer.max_steps=6", "trainer.eval_every=6"])  # fmt: skip
    features = prepare(cfg.data, cfg.task, cfg.seed)
    fz = Featurizer.load(features)
    users = pq.read_table(features.parent / "labeled" / "split=train" / "task=home")["user"].combine_chunks()
    letters = set(pc.utf8_slice_codeunits(users.drop_null(), 0, 1).to_pylist())
    assert fz.spec.context["user"].kind == "first_letter" and set(fz.vocabs["user"].to_pylist()) == letters
    ids = fz.context(pa.table({"user": ["12", "19", None]}))["ctx.user"].to_pylist()
    assert ids[0] == ids[1] != ids[2] == SENTINEL
    assert fz.spec.table_of("user").size == FIRST_ID + len(letters)
    out = run(cfg, tmp_path / "run", features)
    assert np.isfinite(out["valid"]["home"]["auc"]) and (tmp_path / "run" / "metrics.json").exists()


def test_an_unknown_kind_fails_at_compose_time_naming_the_known_ones():
    with pytest.raises(Exception, match=r"unknown field kind 'colour'; known kinds: \['categorical'"):
        compose(["task.home.context.user.kind=colour"])
