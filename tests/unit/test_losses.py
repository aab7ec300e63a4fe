"""Per-task objectives: BCE, the log-Q corrected in-batch softmax and BPR, checked against references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from unirec.config import compose
from unirec.losses import Objective, bpr, sampled_softmax, task_losses, task_mean
from unirec.train import setup, train_step


def test_bce_task_mean_matches_torch_on_each_task_rows():
    g = torch.Generator().manual_seed(0)
    logits, label = torch.randn(12, generator=g), (torch.rand(12, generator=g) > 0.5).float()
    weight, head = torch.rand(12, generator=g) + 0.5, torch.tensor([0, 1, 2] * 4)
    losses, counts = task_losses(logits, label, weight, head, 4)
    for k in range(3):
        rows = head == k
        ref = F.binary_cross_entropy_with_logits(
            logits[rows], label[rows], weight=weight[rows], reduction="sum"
        )
        assert losses[k].item() == pytest.approx((ref / weight[rows].sum()).item(), rel=1e-6)
    assert losses[3].item() == 0 and counts.tolist() == [4, 4, 4, 0]


def test_sampled_softmax_is_cross_entropy_over_the_valid_candidates_with_log_q_subtracted():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(5, generator=g), torch.randn(5, 7, generator=g)
    valid = torch.rand(5, 7, generator=g) > 0.3
    lq_pos, lq_neg = -torch.rand(5, generator=g) * 3, -torch.rand(5, 7, generator=g) * 3
    got = sampled_softmax(pos, neg, valid, lq_pos, lq_neg)
    for p in range(5):
        logits = torch.cat([(pos[p] - lq_pos[p]).view(1), (neg[p] - lq_neg[p])[valid[p]]])
        ref = F.cross_entropy(logits.view(1, -1), torch.zeros(1, dtype=torch.long))
        assert got[p].item() == pytest.approx(ref.item(), rel=1e-5)


def test_bpr_is_the_mean_pairwise_logistic_loss_over_valid_candidates():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    got = bpr(pos, neg, valid)
    ref0 = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert got.tolist() == pytest.approx([ref0, 0.0], rel=1e-6)


def _batch(ids, request, label, head_of_row):
    return SimpleNamespace(
        candidate={"item": torch.tensor(ids)},
        request_id=torch.tensor(request),
        label=torch.tensor(label, dtype=torch.float),
        weight=torch.ones(len(ids)),
    ), torch.tensor(head_of_row)


def test_objective_masks_the_own_item_and_the_requests_other_positives():
    # rows: 0 and 1 are positives of request 7 (items 10, 11); row 2 a negative of request 7 (item 12);
    # row 3 a positive of request 8 holding item 10 again; row 4 a bce task's row.
    batch, head = _batch([10, 11, 12, 10, 13], [7, 7, 7, 8, 9], [1, 1, 0, 1, 1], [0, 0, 0, 0, 1])
    obj = Objective(["softmax", "bce"], negatives=16, logq=[None, None], id_field=["item", "item"])
    [(k, rows, pool)] = obj.pools(batch, head, torch.Generator().manual_seed(0))
    assert k == 0 and rows.tolist() == [0, 1, 3] and sorted(pool.tolist()) == [0, 1, 2, 3]
    own = torch.zeros(5)
    neg = torch.zeros(3, 4)
    loss, weight = obj.row_losses(batch, head, own, [(k, rows, pool)], [neg])
    items = batch.candidate["item"]
    # row 0 (item 10, request 7): row 1 is its request's other positive, row 3 holds item 10 -> one valid
    # candidate (row 2's item 12). Row 1: row 0 masked, row 3 (another request, item 10) and row 2 valid.
    # Row 3 (item 10, request 8): row 0 holds item 10; rows 1 and 2 are valid.
    valid_count = {0: 1, 1: 2, 3: 2}
    for r, n in valid_count.items():
        assert loss[r].item() == pytest.approx(math.log(1 + n), rel=1e-6), (r, items[pool].tolist())
    assert weight.tolist() == [1, 1, 0, 1, 1]  # the softmax task's negative row trains nothing itself
    assert loss[4].item() == pytest.approx(math.log(2), rel=1e-6)  # the bce row: its own logit, label 1


def test_the_catalogue_softmax_adds_the_cross_entropy_of_each_positive_over_the_whole_catalogue():
    # positives rows 0 and 1 (items 10 and 11; 11 has no catalogue row of its own), row 2 a negative
    batch, head = _batch([10, 11, 12], [7, 8, 8], [1, 1, 0], [0, 0, 0])
    row_of_id = torch.full((20,), -1)
    row_of_id[10], row_of_id[12] = 2, 0
    catalogue = ({"item": torch.tensor([12, 13, 10])}, "item", row_of_id)
    obj = Objective(["softmax"], 16, [None], ["item"], [catalogue], catalogue_weight=0.5)
    pools = obj.pools(batch, head, torch.Generator().manual_seed(0))
    [(rows, fields, ctype)] = obj.catalogue_requests(pools)
    assert rows.tolist() == [0, 1] and ctype == "item" and fields is catalogue[0]
    full = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    neg = torch.zeros(2, len(pools[0][2]))
    with_full, _ = obj.row_losses(batch, head, torch.zeros(3), pools, [neg], [full])
    without, _ = Objective(["softmax"], 16, [None], ["item"]).row_losses(
        batch, head, torch.zeros(3), pools, [neg]
    )
    ce0 = math.log(1 + math.e + math.e**2) - 2.0  # item 10 is catalogue row 2
    assert with_full[0].item() == pytest.approx(without[0].item() + 0.5 * ce0, rel=1e-6)
    assert with_full[1].item() == pytest.approx(without[1].item())  # no row of its own: no catalogue term
    assert Objective(["softmax"], 16, [None], ["item"]).catalogue_requests(pools) is None


def test_task_mean_ignores_zero_weight_rows():
    losses, counts = task_mean(
        torch.tensor([1.0, 5.0, 3.0]), torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), 1
    )
    assert losses.item() == pytest.approx(2.0) and counts.tolist() == [2]  # present: the rows with a loss


@pytest.mark.parametrize("loss", ["softmax", "bpr"])
def test_a_softmax_or_bpr_step_trains_and_lowers_its_loss(toy_features, loss):
    cfg = compose(["debug=toy", f"task.home.loss={loss}", "task.search.loss=softmax", "loader.prefetch=0",
                   "loader.batch_size=256", "loss.negatives=32", "optim.lr=0.01", "trainer.max_steps=40"])  # fmt: skip
    tr = setup(cfg, toy_features)
    assert tr.objective.kinds[tr.module.task_names.index("home")] == loss
    assert tr.objective.logq[tr.module.task_names.index("search")] is not None
    batch = tr.loader.next_batch()
    first = train_step(tr, batch, step=1)
    assert first.stepped and torch.isfinite(first.losses).all()
    for step in range(2, 30):
        train_step(tr, batch, step=step)
    last = train_step(tr, batch, step=30)
    home = tr.module.task_names.index("home")
    assert last.losses[home] < first.losses[home] * 0.9, (first.losses, last.losses)


def test_the_catalogue_of_a_softmax_task_maps_each_id_to_its_own_row_and_trains(toy_features):
    from unirec.kinds import FIRST_ID

    cfg = compose(["debug=toy", "task.home.loss=softmax", "loader.prefetch=0", "loader.batch_size=256",
                   "loss.catalogue=1.0", "model.dot_product=true", "trainer.max_steps=10"])  # fmt: skip
    tr = setup(cfg, toy_features)
    home = tr.module.task_names.index("home")
    fields, ctype, row = tr.objective.catalogues[home]
    ids = fields["item"]
    assert ctype == "item" and len(ids) > 10
    mapped = (row >= 0).nonzero().squeeze(1)
    assert len(mapped) > 0 and (mapped >= FIRST_ID).all()
    assert torch.equal(ids[row[mapped]], mapped)  # every mapped id's row holds that id
    assert all(c is None for k, c in enumerate(tr.objective.catalogues) if tr.objective.kinds[k] == "bce")
    batch = tr.loader.next_batch()
    first = train_step(tr, batch, step=1)
    for step in range(2, 10):
        train_step(tr, batch, step=step)
    assert first.stepped and train_step(tr, batch, step=10).losses[home] < first.losses[home]


def test_log_q_is_the_log_share_of_each_candidate_among_the_task_train_rows(toy_features):
    import pyarrow.parquet as pq

    from unirec.data.loader import shard_files

    cfg = compose(["debug=toy", "task.home.loss=softmax", "loader.prefetch=0"])
    tr = setup(cfg, toy_features)
    lq = tr.objective.logq[tr.module.task_names.index("home")]
    ids = [
        i
        for f in shard_files(toy_features, "train", "home")
        for i in pq.read_table(f)["cand.item"].to_pylist()
    ]
    top = max(set(ids), key=ids.count)
    assert lq.exp().sum().item() == pytest.approx(1.0, rel=1e-5)
    assert lq[top].exp().item() == pytest.approx(ids.count(top) / len(ids), rel=1e-5)
