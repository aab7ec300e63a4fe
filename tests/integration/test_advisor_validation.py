"""The advisor validation script's statistics on fixed inputs (fast; the sweep itself is a script run)."""

from __future__ import annotations

import math

import pytest


def _script():
    from unirec.experiments import advisor_check

    return advisor_check


def test_spearman_with_ties_against_hand_computed_values():
    v = _script()
    assert v.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert v.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(v.spearman([1, 2], [1, 2]))


def _advice(benefits):
    return {"advice": {t: {"benefit": b, "stderr": 0.01, "verdict": "gains" if b > 0 else "loses", "group": [t]}
                       for t, b in benefits.items()}}  # fmt: skip


def _measured(cells):
    return {"test": {f"sampled|{t}|ndcg@10": {"unified": u, "bespoke": b} for t, (u, b) in cells.items()}}


CELLS = {
    "a": ([0.62, 0.64], [0.60, 0.60]),
    "b": ([0.50, 0.52], [0.51, 0.51]),
    "c": ([0.40, 0.40], [0.45, 0.44]),
}
"""Task -> (unified, bespoke) test NDCG@10 over two seeds."""


def test_points_and_summary_count_what_the_acceptance_reads():
    v = _script()
    cells = CELLS
    pts = v.points(
        "synthetic-0.0", list(cells), _advice({"a": 0.3, "b": -0.1, "c": 0.2}), _measured(cells), "sampled"
    )
    by = {p["task"]: p for p in pts}
    assert by["a"]["lift"] == pytest.approx(0.63 / 0.60 - 1) and by["a"]["clear"]
    assert not by["b"]["clear"]  # +0.00 against a spread of 0.014
    assert by["c"]["clear"] and by["c"]["loses_every_seed"]
    s = v.summary(pts, {"synthetic-0.0": {"advise_seconds": 5.0, "measure_seconds": 100.0}})
    assert (s["n"], s["clear_points"], s["sign_agreement"]) == (3, 2, 1)
    assert s["sign_disagreements"] == ["synthetic-0.0/c"]
    assert s["losers_at_0"] == [{"task": "c", "flagged": False, "verdict": "gains"}]
    assert s["max_cost_ratio"] == pytest.approx(0.05)
    assert s["spearman"] == pytest.approx(v.spearman([0.3, -0.1, 0.2], [by[t]["lift"] for t in "abc"]))


def test_the_consolidation_report_takes_any_relatedness_as_a_suite():
    from unirec.experiments import consolidation, suites

    args = consolidation.parser().parse_args(["--suites", "synthetic-0.25"])
    suite = suites.suites(args)["synthetic-0.25"]
    assert "data.synthetic.relatedness=0.25" in suite.overrides
    assert suites.suite_dir("synthetic-0.25") == "synthetic/relatedness-0.25"
    assert (
        suites.suite_dir("synthetic-1.0") == "synthetic/relatedness-1.0"
        and suites.suite_dir("ml100k") == "ml100k"
    )
    assert suites.relatedness("1") == "1.0"
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        suites.relatedness("1.5")


def test_the_summary_ranks_by_the_predicted_lift_and_reports_held_out_suites():
    v = _script()
    cells = CELLS
    lifts = {"a": -0.2, "b": 0.5, "c": 0.1}  # an order the benefits (0.3, -0.1, 0.2) do not give
    advice = _advice({"a": 0.3, "b": -0.1, "c": 0.2})
    advice["headroom_metric"] = "ndcg@10"
    for t, lift in lifts.items():
        advice["advice"][t].update({"predicted_lift": lift, "short_run_ndcg@10": 0.5})
    pts = v.points("synthetic-0.4", list(cells), advice, _measured(cells), "sampled")
    pts += v.points(
        "synthetic-0.0", list(cells), _advice({"a": 0.3, "b": -0.1, "c": 0.2}), _measured(cells), "sampled"
    )
    assert [p["short_run"] for p in pts[:3]] == [0.5] * 3 and pts[3]["short_run"] is None
    s = v.summary(
        pts, {"synthetic-0.0": {"advise_seconds": 5.0, "measure_seconds": 100.0}}, ["synthetic-0.4"]
    )
    measured = [p["lift"] for p in pts]
    assert s["spearman"] == pytest.approx(v.spearman([-0.2, 0.5, 0.1, 0.3, -0.1, 0.2], measured))
    assert s["spearman_benefit"] == pytest.approx(v.spearman([0.3, -0.1, 0.2] * 2, measured))
    assert s["n_held_out"] == 3
    assert s["spearman_held_out"] == pytest.approx(v.spearman([-0.2, 0.5, 0.1], measured[:3]))


def test_the_sign_is_the_advices_helps_where_it_has_one():
    """With the alignment rule the advisor's sign is its ``helps``, not the benefit's sign: c's benefit is
    positive but it is predicted to lose (as it does), a's is negative but it is predicted to gain."""
    v = _script()
    advice = _advice({"a": -0.3, "b": -0.1, "c": 0.2})
    for t, helps in {"a": True, "b": True, "c": False}.items():
        advice["advice"][t].update(
            {"helps": helps, "alignment": 0.1 if helps else 0.01, "verdict": "unclear"}
        )
    pts = v.points("synthetic-0.0", list(CELLS), advice, _measured(CELLS), "sampled")
    s = v.summary(
        pts, {"synthetic-0.0": {"advise_seconds": 5.0, "measure_seconds": 100.0}}, ["synthetic-0.0"]
    )
    assert (s["clear_points"], s["sign_agreement"], s["sign_disagreements"]) == (2, 2, [])
    assert (s["clear_points_held_out"], s["sign_agreement_held_out"]) == (2, 2)
    assert s["losers_at_0"] == [{"task": "c", "flagged": True, "verdict": "unclear"}]
    assert [p["alignment"] for p in pts] == [0.1, 0.1, 0.01]
