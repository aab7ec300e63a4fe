"""The advisor's measurements: lookahead affinity against hand-computed and reference values, the grouping
search on fixed matrices, the per-task benefit, and the settings it refuses."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from unirec.advise import adam_direction, check_advise, ranker_lookahead, shared_parameters
from unirec.affinity import (
    AffinityLog,
    Lookahead,
    alignment,
    benefit,
    best_grouping,
    linear_cka,
    lookahead,
    normalised,
    partitions,
)
from unirec.config import LoaderConfig, ModelConfig, compose
from unirec.data.batch import to_batch
from unirec.data.loader import MixedLoader
from unirec.losses import Objective, task_losses, task_mean
from unirec.model import MultiTaskRanker
from unirec.schema import FeatureSpec


class _Tiny(torch.nn.Module):
    """One shared weight w and task b's head bias h: L_a = (w - 1)^2, L_b = (2w + h)^2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.h = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self):
        return torch.stack([(self.w - 1) ** 2, (2 * self.w + self.h) ** 2])


def test_lookahead_on_a_tiny_model_matches_the_hand_computed_values():
    m = _Tiny()

    def losses_at(p):
        return torch.func.functional_call(m, dict(p), ()) if p else m()

    res = lookahead(losses_at, {"w": m.w}, 0.1, torch.tensor([True, True]))
    # At w = 0.5: L_a = 0.25, dL_a/dw = -1; L_b = 1, dL_b/dw = 4.
    # a's step: w = 0.6, L_a = 0.16, L_b = 1.44 -> Z_aa = 1 - 0.16/0.25 = 0.36, Z_ab = 1 - 1.44 = -0.44.
    # b's step: w = 0.1, L_a = 0.81, L_b = 0.04 -> Z_ba = 1 - 0.81/0.25 = -2.24, Z_bb = 0.96.
    # (Had the head h moved with b's step, h = -0.2 and L_b = 0: Z_bb would be 1.)
    expected = torch.tensor([[0.36, -0.44], [-2.24, 0.96]])
    assert torch.allclose(res.affinity, expected, atol=1e-5)
    assert torch.allclose(res.cosine, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-6)
    assert m.w.item() == 0.5 and m.h.item() == 0.0  # the lookahead leaves the model as it was


def test_lookahead_measured_on_held_out_losses_matches_the_hand_computed_values():
    """The steps are the batch's (as above); Z is read on held-out losses L'_a = (w - 2)^2, L'_b = (3w)^2,
    and a task without held-out rows (NaN loss) gets a NaN column."""
    m = _Tiny()

    def losses_at(p):  # a third task without rows in the batch either
        two = torch.func.functional_call(m, dict(p), ()) if p else m()
        return torch.cat([two, torch.zeros(1)])

    def held_out(p):  # the third task has no held-out rows either: NaN, as LossesAt says
        w = p.get("w", m.w)
        return torch.stack([(w - 2) ** 2, (3 * w) ** 2, torch.tensor(math.nan)])

    res = lookahead(losses_at, {"w": m.w}, 0.1, torch.tensor([True, True, False]), held_out=held_out)
    # At w = 0.5: L'_a = 2.25, L'_b = 2.25. a's step -> w = 0.6: L'_a = 1.96, L'_b = 3.24.
    # b's step -> w = 0.1: L'_a = 3.61, L'_b = 0.09.
    expected = torch.tensor([[1 - 1.96 / 2.25, 1 - 3.24 / 2.25], [1 - 3.61 / 2.25, 1 - 0.09 / 2.25]])
    assert torch.allclose(res.affinity[:2, :2], expected, atol=1e-5)
    assert res.affinity[:, 2].isnan().all() and res.affinity[2].isnan().all()


def test_a_task_the_batch_lacks_but_the_held_out_rows_have_keeps_its_cosines():
    """With held-out rows, Z has a column for a task absent from the stepped batch while its cosines are
    NaN for that step: the cosine mean counts its own steps, so one such step does not void the pair."""
    log = AffinityLog(2)
    nan = math.nan
    log.add(Lookahead(torch.tensor([[0.5, 0.1], [nan, nan]]), torch.tensor([[1.0, nan], [nan, nan]]),
                      torch.tensor([True, False])))  # fmt: skip
    log.add(Lookahead(torch.tensor([[0.3, 0.3], [0.2, 0.4]]), torch.tensor([[1.0, 0.5], [0.5, 1.0]]),
                      torch.tensor([True, True])))  # fmt: skip
    assert log.mean_cosine()[0, 1].item() == pytest.approx(0.5)
    assert log.mean_affinity()[0, 1].item() == pytest.approx(0.2)  # both steps read task 1
    assert log.mean_affinity()[1, 0].item() == pytest.approx(0.2)  # one step stepped task 1


def test_an_absent_task_gets_nan_and_no_lookahead():
    m = _Tiny()
    calls = []

    def losses_at(p):
        calls.append(dict(p))
        return torch.func.functional_call(m, dict(p), ()) if p else m()

    res = lookahead(losses_at, {"w": m.w}, 0.1, torch.tensor([True, False]))
    assert len(calls) == 2  # the base forward and a's lookahead only
    assert res.affinity[0, 0].item() == pytest.approx(0.36, abs=1e-5)
    assert math.isnan(res.affinity[0, 1]) and math.isnan(res.affinity[1, 0]) and math.isnan(res.cosine[1, 1])


def test_adam_lookahead_on_a_tiny_model_matches_the_hand_computed_values():
    m = _Tiny()
    opt = torch.optim.Adam([m.w, m.h], lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    # made before the optimizer has any state, as the advisor makes it
    direction = adam_direction([opt], {"w": m.w})
    m().sum().backward()  # dL/dw = -1 + 4 = 3 at w = 0.5: one Adam step leaves v_w = 0.001 * 9, step 1
    opt.step()
    opt.zero_grad()
    w = m.w.item()  # 0.4 (Adam's first step moves w by lr against the gradient's sign)
    # Task a: g_a = 2(w - 1) = -1.2; v' = 0.999 * 0.009 + 0.001 * 1.44; v_hat = v' / (1 - 0.999**2).
    # Task b: g_b = 4(2w + h) = 3.2 (h = -0.1 after its own first step: dL/dh = 2(2w + h) = 2 at the start).
    h = m.h.item()
    ga, gb = 2 * (w - 1), 4 * (2 * w + h)
    da = ga / math.sqrt((0.999 * 0.009 + 0.001 * ga**2) / (1 - 0.999**2))
    db = gb / math.sqrt((0.999 * 0.009 + 0.001 * gb**2) / (1 - 0.999**2))

    def la(v):
        return (v - 1) ** 2

    def lb(v):
        return (2 * v + h) ** 2

    expected = torch.tensor(
        [[1 - la(w - 0.1 * da) / la(w), 1 - lb(w - 0.1 * da) / lb(w)],
         [1 - la(w - 0.1 * db) / la(w), 1 - lb(w - 0.1 * db) / lb(w)]]
    )  # fmt: skip

    def losses_at(p):
        return torch.func.functional_call(m, dict(p), ()) if p else m()

    res = lookahead(losses_at, {"w": m.w}, 0.1, torch.tensor([True, True]), direction)
    assert torch.allclose(res.affinity, expected, atol=1e-5)
    assert m.w.item() == w  # the lookahead leaves the model and its optimizer as they were
    assert opt.state[m.w]["exp_avg_sq"].item() == pytest.approx(0.009)


def test_adam_direction_without_state_is_adams_first_step_and_refuses_a_foreign_parameter():
    w = torch.nn.Parameter(torch.tensor([0.5, -2.0]))
    opt = torch.optim.AdamW([w], lr=0.1)
    d = adam_direction([opt], {"w": w})
    assert d("w", torch.tensor([0.3, -4.0])).tolist() == pytest.approx([1.0, -1.0], abs=1e-6)
    with pytest.raises(KeyError, match="other"):
        adam_direction([opt], {"other": torch.nn.Parameter(torch.zeros(1))})("other", torch.ones(1))


def _toy_model(features):
    spec = FeatureSpec.load(features / "feature_spec.json")
    torch.manual_seed(0)
    model = MultiTaskRanker(spec, ModelConfig(embedding_dim=8, hidden_dim=16, head_hidden=8))
    ld = MixedLoader(features, spec, LoaderConfig(batch_size=256, prefetch=0, mix="uniform"), {}, 0)
    return model, to_batch(ld.next_arrays(), spec).to(torch.device("cpu"))


def _objective(model, spec, kinds):
    ids = [spec.candidates[spec.tasks[t].candidate].id_field for t in model.task_names]
    return Objective(kinds, 16, [None] * len(kinds), ids)


@pytest.mark.parametrize("first", ["bce", "softmax"])
def test_ranker_lookahead_matches_an_explicit_sgd_step_on_a_copy(toy_features, first):
    """Reference: for each task, backward on a copy, step its non-head parameters by -lr * grad, re-evaluate,
    all under the training objective (the first task a sampled softmax over the same in-batch draw)."""
    model, batch = _toy_model(toy_features)
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    k = len(model.task_names)
    obj = _objective(model, spec, [first] + ["bce"] * (k - 1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, step = 0.05, 7
    got = ranker_lookahead(model, obj, batch, lr, step=step)
    head = model.head_index(batch.task_type)
    pools = obj.pools(batch, head, torch.Generator().manual_seed(step)) if obj.sampled else []

    def losses(m):
        logits, pairs, full = obj.forward_logits(m, batch, pools)
        per_row, weight = obj.row_losses(batch, head, logits, pools, pairs, full)
        return task_mean(per_row, weight, head, k)[0]

    if first == "softmax":  # the softmax task's loss is not the BCE of its rows: the objective is used
        bce = task_losses(model(batch), batch.label, batch.weight, head, k)[0]
        assert not torch.allclose(losses(model)[0], bce[0])
    base = losses(model).detach()
    for i in range(k):
        ref = copy.deepcopy(model)
        losses(ref)[i].backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if not n.startswith("heads.") and p.grad is not None:
                    p -= lr * p.grad
            after = losses(ref)
        assert torch.allclose(got.affinity[i], (1 - after / base).float(), atol=1e-5, rtol=1e-4), i
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert got.present.all() and set(shared_parameters(model)) == {
        n for n, _ in model.named_parameters() if not n.startswith("heads.")
    }


def test_partitions_are_the_bell_numbers_each_once():
    for n, bell in ((1, 1), (4, 15), (6, 203)):
        ps = list(partitions([f"t{i}" for i in range(n)]))
        assert len(ps) == bell
        assert len({tuple(sorted(tuple(sorted(g)) for g in p)) for p in ps}) == bell


def _matrix(names, pairs):
    a = {i: {j: (1.0 if i == j else 0.0) for j in names} for i in names}
    for (i, j), v in pairs.items():
        a[i][j] = v
    return a


def test_grouping_search_on_a_fixed_affinity_matrix():
    names = ["a", "b", "c", "d", "e"]
    # a and b help each other, c and d help each other, the two pairs hurt each other; e hurts whoever
    # shares with it (c by 0.3, a by 0.1) and gains little (0.15 from a): alone it is better for all.
    pairs = {("a", "b"): 0.4, ("b", "a"): 0.3, ("c", "d"): 0.2, ("d", "c"): 0.25,
             ("a", "c"): -0.2, ("c", "a"): -0.1, ("b", "d"): -0.3, ("d", "b"): -0.2,
             ("e", "a"): -0.1, ("a", "e"): 0.05, ("e", "c"): -0.3, ("c", "e"): 0.1}  # fmt: skip
    g = best_grouping(_matrix(names, pairs))
    assert sorted(sorted(x) for x in g.groups) == [["a", "b"], ["c", "d"], ["e"]]
    assert g.score == pytest.approx(0.4 + 0.3 + 0.2 + 0.25)
    assert g.onto == pytest.approx({"a": 0.3, "b": 0.4, "c": 0.25, "d": 0.2, "e": 0.0})
    assert g.searched == 52
    # Raise e's effect on a to +0.2: with a and b, e now adds 0.2 onto a and gets 0.05 from a: it joins.
    pairs[("e", "a")] = 0.2
    g = best_grouping(_matrix(names, pairs))
    assert sorted(sorted(x) for x in g.groups) == [["a", "b", "e"], ["c", "d"]]
    assert g.score == pytest.approx(0.4 + 0.3 + 0.2 + 0.25 + 0.2 + 0.05)


def test_grouping_ties_go_to_fewer_models_and_unknown_pairs_count_zero():
    names = ["a", "b", "c"]
    g = best_grouping(_matrix(names, {("a", "b"): math.nan}))
    assert g.groups == [["a", "b", "c"]] and g.score == 0.0


def test_grouping_search_refuses_more_tasks_than_it_may_enumerate():
    names = [f"t{i}" for i in range(7)]
    with pytest.raises(ValueError, match="advise.max_group_tasks=6"):
        best_grouping(_matrix(names, {}), max_tasks=6)


def test_normalised_and_benefit_by_hand():
    steps = [torch.tensor([[0.2, 0.1], [0.0, 0.4]]), torch.tensor([[0.2, 0.3], [-0.2, 0.4]])]
    log = AffinityLog(2)
    for z in steps:
        log.add(Lookahead(z, torch.eye(2), torch.tensor([True, True])))
    z = log.mean_affinity()
    assert torch.allclose(z, torch.tensor([[0.2, 0.2], [-0.1, 0.4]], dtype=torch.float64))
    assert torch.allclose(normalised(z), torch.tensor([[1.0, 0.5], [-0.5, 1.0]], dtype=torch.float64))
    b, se = benefit(log.steps, z)
    # task 0: per step 0.0/0.2 and -0.2/0.2 -> mean -0.5, std 0.7071, se 0.5; task 1: 0.25, 0.75 -> 0.5, 0.25
    assert b.tolist() == pytest.approx([-0.5, 0.5])
    assert se.tolist() == pytest.approx([0.5, 0.25])


def test_a_task_whose_own_step_does_not_help_has_no_normalised_column():
    a = normalised(torch.tensor([[-0.1, 0.2], [0.3, 0.4]]))
    assert math.isnan(a[0, 0]) and math.isnan(a[1, 0]) and a[0, 1].item() == pytest.approx(0.5)


def test_probe_and_a_lookahead_measured_on_it(toy_features):
    """make_probe: validation rows, N per task (a softmax task's half positives); ranker_lookahead with it
    steps on the batch and reads the probe's losses, as an explicit step on a copy does."""
    from unirec.advise import make_probe

    model, batch = _toy_model(toy_features)
    spec = FeatureSpec.load(toy_features / "feature_spec.json")
    k = len(model.task_names)
    obj = _objective(model, spec, ["softmax"] + ["bce"] * (k - 1))
    probe = make_probe(toy_features, spec, model, obj, 40, 3, torch.device("cpu"))
    counts = torch.bincount(probe.head, minlength=k)
    assert (counts > 0).all() and (counts <= 40).all()
    first = probe.head == 0
    assert 0 < int(probe.batch.label[first].gt(0).sum()) <= 20
    again = make_probe(toy_features, spec, model, obj, 40, 3, torch.device("cpu"))
    assert torch.equal(again.batch.label, probe.batch.label) and torch.equal(again.head, probe.head)
    lr, step = 0.05, 7
    got = ranker_lookahead(model, obj, batch, lr, step=step, probe=probe)
    head = model.head_index(batch.task_type)
    pools = obj.pools(batch, head, torch.Generator().manual_seed(step))

    def losses(m, b, h, ps):
        logits, pairs, full = obj.forward_logits(m, b, ps)
        return task_mean(*obj.row_losses(b, h, logits, ps, pairs, full), h, k)[0]

    base = losses(model, probe.batch, probe.head, probe.pools).detach()
    for i in range(k):
        ref = copy.deepcopy(model)
        losses(ref, batch, head, pools)[i].backward()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if not n.startswith("heads.") and p.grad is not None:
                    p -= lr * p.grad
            after = losses(ref, probe.batch, probe.head, probe.pools)
        assert torch.allclose(got.affinity[i], (1 - after / base).float(), atol=1e-5, rtol=1e-4), i


def test_linear_cka_by_hand_and_its_invariances():
    x, y = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[1.0], [3.0], [2.0]])
    # centred: x = (-1, 0, 1), y = (-1, 1, 0); ||xᵀy||² = 1, ||xᵀx|| = ||yᵀy|| = 2 -> 1/4
    assert linear_cka(x, y) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert linear_cka(a, 3.0 * a @ q + 1.0) == pytest.approx(1.0)  # rotated, scaled and shifted
    assert linear_cka(a, torch.randn(50, 4, generator=g)) < 0.3
    assert math.isnan(linear_cka(a, torch.ones(50, 4)))


def test_alignment_reads_only_the_rows_both_tasks_touched():
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(3, 5, 2, generator=g)
    grads[0, 4] = 0.0  # task 0 touched rows 0-3
    grads[2, :3] = 0.0  # task 2 touched rows 3-4: two rows in common with each, no more than d = 2
    m = alignment(grads)
    assert m[0, 1] == m[1, 0] == pytest.approx(linear_cka(grads[0, :4], grads[1, :4]))
    assert m[0, 1] != pytest.approx(linear_cka(grads[0], grads[1]))  # row 4 (task 0's zeros) left out
    assert math.isnan(m[0, 2]) and math.isnan(m[1, 2]) and math.isnan(m[2, 1])  # n <= d: no alignment
    assert torch.diagonal(m).tolist() == pytest.approx([1.0, 1.0, math.nan], nan_ok=True)


def test_lookahead_keeps_each_tasks_gradient_and_the_log_sums_them():
    m = _Tiny()

    def losses_at(p):
        two = torch.func.functional_call(m, dict(p), ()) if p else m()
        return torch.cat([two, torch.zeros(1)])

    present = torch.tensor([True, True, False])
    res = lookahead(losses_at, {"w": m.w}, 0.1, present, keep=["w"])
    assert res.grads["w"].tolist() == pytest.approx([-1.0, 4.0, 0.0])  # dL_a/dw, dL_b/dw, absent: 0
    log = AffinityLog(3)
    log.add(res)
    log.add(res)
    assert log.grads["w"].tolist() == pytest.approx([-2.0, 8.0, 0.0])
    assert lookahead(losses_at, {"w": m.w}, 0.1, present).grads == {}


def _log_with_grads(benefit_rows, grads):
    log = AffinityLog(len(benefit_rows))
    z = torch.tensor(benefit_rows)
    log.add(
        Lookahead(z, torch.eye(len(z)), torch.ones(len(z), dtype=torch.bool), {"tables.item.weight": grads})
    )
    log.add(Lookahead(z * 1.1, torch.eye(len(z)), torch.ones(len(z), dtype=torch.bool)))
    return log


def test_the_alignment_rule_takes_a_misaligned_task_out_of_its_group():
    from unirec.advice import build_advice

    names = ["a", "b", "c"]
    g = torch.Generator().manual_seed(1)
    base = torch.randn(30, 4, generator=g)
    grads = torch.stack(
        [base, base @ torch.linalg.qr(torch.randn(4, 4, generator=g))[0], torch.randn(30, 4, generator=g)]
    )
    # every task helps every other: the lookahead alone would put all three in one model
    z = [[0.4, 0.2, 0.2], [0.2, 0.4, 0.2], [0.2, 0.2, 0.4]]
    ov = {
        k: {i: {j: 1.0 for j in names} for i in names} for k in ("context", "candidate_type", "candidate_set")
    }
    tables = {t: "tables.item.weight" for t in names}
    adv = build_advice(names, _log_with_grads(z, grads), ov, 6, tables, min_alignment=0.5)
    a = adv["advice"]
    m = alignment(grads.double())
    assert a["c"]["alignment"] == pytest.approx(float(m[2, :2].mean())) and a["c"]["alignment"] < 0.5
    assert a["a"]["alignment"] == pytest.approx(float((m[0, 1] + m[0, 2]) / 2))
    assert a["c"]["verdict"] == "gains" and not a["c"]["helps"] and a["c"]["group"] == ["c"]
    assert a["c"]["recommendation"].startswith("keep bespoke")
    assert a["a"]["helps"] and a["a"]["group"] == ["a", "b"] and a["b"]["group"] == ["a", "b"]
    assert sorted(map(sorted, adv["grouping"]["groups"])) == [["a", "b"], ["c"]]
    assert adv["grouping"]["score"] == pytest.approx(1.0)  # 0.2/0.4 each way between a and b
    assert adv["alignment"]["tables.item.weight"]["a"]["b"] == pytest.approx(1.0, abs=1e-6)
    # without the rule the same measurement keeps one model for all
    adv = build_advice(names, _log_with_grads(z, grads), ov, 6, tables, min_alignment=None)
    assert adv["advice"]["c"]["helps"] and adv["grouping"]["groups"] == [names]
    # without the rule the sign is the benefit's: c helped by neither other task now predicted to lose
    z = [[0.4, 0.2, -0.1], [0.2, 0.4, -0.1], [0.2, 0.2, 0.4]]
    adv = build_advice(names, _log_with_grads(z, grads), ov, 6, tables, min_alignment=None)
    assert [adv["advice"][t]["helps"] for t in names] == [True, True, False]
    assert adv["advice"]["c"]["benefit"] == pytest.approx(-0.5)


def test_a_pair_never_measured_counts_zero_in_the_advice_and_its_json_stays_standard():
    import json

    from unirec.advice import build_advice

    names = ["a", "b", "c"]
    z = [[0.4, math.nan, 0.2], [0.2, 0.4, 0.2], [0.2, 0.2, 0.4]]  # a's step never read on b
    grads = torch.randn(3, 30, 4, generator=torch.Generator().manual_seed(2))
    ov = {
        k: {i: {j: 1.0 for j in names} for i in names} for k in ("context", "candidate_type", "candidate_set")
    }
    tables = {t: "tables.item.weight" for t in names}
    for rule in (None, 0.9):  # 0.9: every task misaligned, the search runs over none of them
        adv = build_advice(names, _log_with_grads(z, grads), ov, 6, tables, rule)
        assert all(math.isfinite(adv["advice"][t]["onto_from_group"]) for t in names), rule
        json.dumps(adv["advice"], allow_nan=False)
        assert adv["normalised_affinity"]["a"]["b"] is None
    assert adv["grouping"]["groups"] == [["a"], ["b"], ["c"]]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["advise.min_alignment=1.5"], r"advise.min_alignment must be in \[0, 1\] or null"),
        (["advise.probe_rows=1"], r"advise.probe_rows must be 0 \(off\) or >= 2"),
        (["advise.fraction=0"], "advise.fraction must be in"),
        (["advise.measure_every=0"], "advise.measure_every must be >= 1"),
        (["advise.skip_steps=15"], "raise advise.fraction or lower advise.skip_steps"),
        (["task=[home]"], "select at least two"),
        (["advise.max_group_tasks=4"], "advise.max_group_tasks=4"),
    ],
)
def test_settings_the_advisor_refuses_name_the_key(overrides, match):
    with pytest.raises(Exception, match=match):
        check_advise(compose(["debug=toy", *overrides]))


def test_headroom_by_hand():
    from unirec.advice import headroom

    assert (
        headroom(0.25) == pytest.approx(3.0) and headroom(0.5) == pytest.approx(1.0) and headroom(1.0) == 0.0
    )
    assert all(math.isnan(headroom(v)) for v in (None, 0.0, -0.1, 1.5))
