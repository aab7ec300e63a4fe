"""Loss balancers against their formulas: static, uncertainty (Kendall et al.), GradNorm (Chen et al.)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from unirec.balancing import (
    BALANCERS,
    GradNormBalancer,
    LossBalancer,
    UncertaintyBalancer,
    build_balancer,
    task_grad_norms,
)
from unirec.config import LossConfig, compose
from unirec.losses import total_loss
from unirec.model import MultiTaskRanker
from unirec.train import check, setup, train_step

NAMES = ["home", "related", "search"]
LW = torch.tensor([1.0, 0.5, 2.0])
LOSSES = torch.tensor([0.7, 1.2, 0.4])


def _build(balancing: str, **kw) -> LossBalancer:
    return build_balancer(LossConfig(balancing=balancing, **kw), LW, NAMES)


def test_static_is_the_weighted_sum_the_loop_always_used():
    b = _build("static")
    counts = torch.tensor([3.0, 0.0, 2.0])
    assert torch.equal(b.total(LOSSES, counts), total_loss(LOSSES, LW))
    assert b.total(LOSSES, counts).item() == pytest.approx(0.7 + 0.6 + 0.8)
    assert torch.equal(b.weights(), LW) and b.grads() == [] and b.optimizer is None


def test_uncertainty_total_and_gradient_match_the_formula():
    b = _build("uncertainty")
    s = torch.tensor([0.3, -0.5, 0.1])
    with torch.no_grad():
        b.log_var.copy_(s)
    losses = LOSSES.clone().requires_grad_(True)
    counts = torch.tensor([3.0, 2.0, 0.0])  # search absent
    total = b.total(losses, counts)
    total.backward()
    present = torch.tensor([1.0, 1.0, 0.0])
    want = (present * LW * (torch.exp(-s) * LOSSES + s)).sum()
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    # d/ds_k = lw_k * (1 - exp(-s_k) * L_k) for a present task, 0 for an absent one.
    want_ds = present * LW * (1 - torch.exp(-s) * LOSSES)
    assert torch.allclose(b.log_var.grad, want_ds, atol=1e-6) and b.log_var.grad[2] == 0
    # d/dL_k is the effective multiplier the balancer reports.
    assert torch.allclose(losses.grad[:2], b.weights()[:2]) and losses.grad[2] == 0
    assert torch.allclose(b.weights(), LW * torch.exp(-s))


@pytest.mark.parametrize("balancing", BALANCERS)
def test_an_absent_task_contributes_nothing(balancing):
    b = _build(balancing)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3)  # away from the initial state: s != 0, w != lw
    counts = torch.tensor([3.0, 2.0, 0.0])  # search absent; task_losses gives it L = 0
    losses = torch.tensor([0.7, 1.2, 0.0])
    total = b.total(losses, counts)
    w, lw = b.weights(), b.loss_weights
    extra = (lw[:2] * 0.3).sum() if balancing == "uncertainty" else 0.0
    assert total.item() == pytest.approx(((w * losses)[:2].sum() + extra).item(), rel=1e-6)
    with torch.no_grad():
        for p in b.parameters():
            p[2] += 5.0  # the absent task's own balancer state must not matter
    assert torch.equal(b.total(losses, counts), total)


def test_uncertainty_skips_the_log_variance_term_of_an_absent_task():
    b = _build("uncertainty")
    with torch.no_grad():
        b.log_var.fill_(0.7)
    present = b.total(torch.zeros(3), torch.tensor([1.0, 1.0, 1.0]))
    absent = b.total(torch.zeros(3), torch.tensor([1.0, 1.0, 0.0]))
    assert present.item() == pytest.approx(0.7 * LW.sum().item())
    assert absent.item() == pytest.approx(0.7 * (LW[0] + LW[1]).item())


def _two_task_norms():
    """Two task losses through one shared weight W; task 0's gradient there is 10x task 1's."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 4)
    x = torch.randn(8, 4)
    h = shared(x)
    losses = torch.stack([10 * h[:, 0].pow(2).mean(), h[:, 1].pow(2).mean()])
    return losses, task_grad_norms(losses, shared.weight), shared


def test_task_grad_norms_are_the_norms_of_each_task_gradient():
    losses, norms, shared = _two_task_norms()
    for k in range(2):
        (g,) = torch.autograd.grad(losses[k], shared.weight, retain_graph=True)
        assert norms[k].item() == pytest.approx(g.norm().item(), rel=1e-6)
    assert norms[0] > 5 * norms[1]
    assert torch.allclose(task_grad_norms(losses, shared.weight, lambda g: 2 * g), 2 * norms)


def test_gradnorm_gradient_is_that_of_the_l1_gap_with_constant_targets():
    b = GradNormBalancer(torch.ones(3), NAMES, lr=0.1, alpha=1.5)
    b.initial_loss.copy_(torch.tensor([1.0, 2.0, 0.5]))
    b.seen.fill_(True)
    losses, norms, present = (
        torch.tensor([0.5, 1.8, 0.5]),
        torch.tensor([3.0, 0.5, 1.0]),
        torch.ones(3, dtype=torch.bool),
    )
    w = b.weight.detach().clone().requires_grad_(True)
    rate = losses / b.initial_loss
    target = ((w * norms).mean() * (rate / rate.mean()) ** 1.5).detach()
    (w * norms - target).abs().sum().backward()
    assert torch.allclose(b.l1_gap_grad(losses, norms, present), w.grad)


def test_gradnorm_moves_weight_to_the_task_with_the_smaller_gradient_and_keeps_sum_k():
    b = GradNormBalancer(torch.tensor([1.0, 3.0]), NAMES[:2], lr=0.05, alpha=1.5)
    assert torch.allclose(b.weights(), torch.tensor([0.5, 1.5])) and b.weights().sum() == 2
    for _ in range(5):
        losses, norms, _ = _two_task_norms()
        b.update(losses.detach(), torch.ones(2), norms)
        assert b.weights().sum().item() == pytest.approx(2.0)
    w = b.weights()
    assert w[1] > 1.5 and w[0] < 0.5 and (w > 0).all()  # task 1 has the smaller norm


def test_gradnorm_renormalises_to_sum_k_after_each_update():
    b = GradNormBalancer(torch.ones(3), NAMES, lr=0.1, alpha=1.5)
    # G = [4, 1, 1], target 2 each: Adam moves w by [-0.1, +0.1, +0.1], which sums to 3.1 before rescaling.
    b.update(torch.ones(3), torch.ones(3), torch.tensor([4.0, 1.0, 1.0]))
    assert b.weights().tolist() == pytest.approx([0.9 * 3 / 3.1, 1.1 * 3 / 3.1, 1.1 * 3 / 3.1])


def test_gradnorm_sets_initial_losses_the_first_step_each_task_appears():
    b = GradNormBalancer(torch.ones(3), NAMES, lr=0.1, alpha=1.5)
    b.update(torch.tensor([0.7, 1.2, 0.0]), torch.tensor([2.0, 3.0, 0.0]), torch.tensor([1.0, 2.0, 0.0]))
    assert b.seen.tolist() == [True, True, False] and b.initial_loss[2] == 0
    b.update(torch.tensor([0.5, 1.0, 0.9]), torch.tensor([2.0, 3.0, 1.0]), torch.tensor([1.0, 2.0, 1.0]))
    assert b.initial_loss.tolist() == pytest.approx([0.7, 1.2, 0.9])


@pytest.mark.parametrize("balancing", ["static", "uncertainty", "gradnorm"])
def test_state_dict_round_trip_continues_identically(balancing):
    a = _build(balancing)
    counts, norms = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([1.0, 0.3, 2.0])

    def step(b, losses):
        b.zero_grad()
        total = b.total(losses, counts)
        if total.requires_grad:  # uncertainty: s_k trains through the total
            total.backward()
        b.update(losses, counts, norms)

    step(a, torch.tensor([0.7, 1.2, 0.4]))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = _build(balancing)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert torch.equal(a.weights(), b.weights())
    for x in (a, b):
        step(x, torch.tensor([0.5, 1.1, 0.2]))
    assert torch.equal(a.weights(), b.weights())
    if balancing != "static":
        assert not torch.equal(a.weights(), _build(balancing).weights())


def test_state_of_another_balancing_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="loss.balancing=uncertainty"):
        _build("gradnorm").load_state_dict(_build("uncertainty").state_dict())


def test_unknown_balancing_raises_naming_the_key_and_choices():
    with pytest.raises(
        ValueError, match=r"loss.balancing must be one of static, uncertainty, gradnorm; got 'kendall'"
    ):
        _build("kendall")
    with pytest.raises(ValueError, match="loss.balancing"):
        check(compose(["debug=toy", "loss.balancing=kendall"]))
    with pytest.raises(ValueError, match="loss.gradnorm_lr"):
        check(compose(["debug=toy", "loss.gradnorm_lr=0"]))


def _toy(toy_features, balancing: str):
    # genre is drawn for almost no batch, so the first batch lacks it.
    cfg = compose(["debug=toy", f"loss.balancing={balancing}", "loader.mix=weights", "task.genre.sampling_weight=0.001",
                   "loader.prefetch=0", "loader.batch_size=128"])  # fmt: skip
    return setup(cfg, toy_features)


def test_one_step_trains_the_log_variance_of_every_present_task(toy_features):
    tr = _toy(toy_features, "uncertainty")
    res = train_step(tr, tr.loader.next_batch())
    present = res.counts > 0
    assert res.stepped and present.sum() >= 2 and not present.all(), res.counts
    s, grad = tr.balancer.log_var.detach(), tr.balancer.log_var.grad
    assert (grad[present] != 0).all() and (s[present] != 0).all()
    assert (grad[~present] == 0).all() and (s[~present] == 0).all()
    # The reported total is the balanced one: lw_k * (L_k + 0) at s = 0, before the step.
    assert res.loss.item() == pytest.approx((res.losses * tr.loss_weights).sum().item(), rel=1e-6)


@pytest.mark.parametrize("balancing", ["uncertainty", "gradnorm"])
def test_a_skipped_step_leaves_the_balancer_unchanged(monkeypatch, toy_features, balancing):
    tr = _toy(toy_features, balancing)
    assert train_step(tr, tr.loader.next_batch()).stepped
    before = copy.deepcopy(tr.balancer.state_dict())  # state_dict tensors share storage with the live ones
    original = MultiTaskRanker.forward
    monkeypatch.setattr(MultiTaskRanker, "forward", lambda self, batch: original(self, batch) * float("nan"))
    res = train_step(tr, tr.loader.next_batch())
    assert not res.stepped
    after = tr.balancer.state_dict()
    assert all(torch.equal(before["tensors"][k], v) for k, v in after["tensors"].items())
    for i, state in after["optimizer"]["state"].items():
        assert all(torch.equal(before["optimizer"]["state"][i][k], v) for k, v in state.items())


def test_gradnorm_step_reports_grad_norms_static_only_when_asked(toy_features):
    tr = _toy(toy_features, "gradnorm")
    assert train_step(tr, tr.loader.next_batch()).grad_norms is not None
    static = _toy(toy_features, "static")
    assert train_step(static, static.loader.next_batch()).grad_norms is None
    norms = train_step(static, static.loader.next_batch(), grad_norms=True)
    assert norms.grad_norms.shape == (len(static.module.task_names),)
    assert (norms.grad_norms[norms.counts > 0] > 0).all() and (norms.grad_norms[norms.counts == 0] == 0).all()
    assert isinstance(static.balancer, LossBalancer) and not isinstance(static.balancer, UncertaintyBalancer)
