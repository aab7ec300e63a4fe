"""``python -m unirec.advise debug=toy`` end to end in a real process, reading the written files back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

TASKS = ("home", "related", "search", "genre", "genre_rows")


@pytest.fixture(scope="module")
def advice(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    out = cwd / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unirec.advise", "debug=toy", f"data.cache_dir={cwd / 'cache'}", "advise.min_alignment=0.025",
           f"hydra.run.dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out, json.loads((out / "advice.json").read_text())


def test_the_advice_covers_every_task_and_pair(advice):
    proc, _, adv = advice
    assert sorted(adv["tasks"]) == sorted(TASKS)
    # conf/debug/toy.yaml: 0.5 of 30 steps; the warm-up (50) is longer, so half of them (7) are skipped
    assert (adv["steps"], adv["skipped_steps"], adv["measured_steps"]) == (15, 7, 8)
    for kind in ("affinity", "normalised_affinity", "cosine"):
        assert all(set(adv[kind][i]) == set(TASKS) for i in TASKS), kind
    for t in TASKS:
        assert adv["normalised_affinity"][t][t] == pytest.approx(1.0)
        assert adv["cosine"][t][t] == pytest.approx(1.0, abs=1e-5)
        assert adv["overlap"]["context"][t][t] == 1.0
        sign = "gain" if adv["advice"][t]["helps"] else "lose"
        assert f"{t}: predicted to {sign}, {adv['advice'][t]['verdict']}" in proc.stdout
    # the alignment rule: every task but genre_rows ranks items, so each has an alignment at the item table
    assert (
        list(adv["alignment"]) == ["tables.item.weight"] and adv["advice"]["genre_rows"]["alignment"] is None
    )
    item = adv["alignment"]["tables.item.weight"]
    for t in set(TASKS) - {"genre_rows"}:
        mates = [item[t][j] for j in TASKS if j not in (t, "genre_rows")]
        assert adv["advice"][t]["alignment"] == pytest.approx(sum(mates) / len(mates), rel=1e-5)
        misaligned = adv["advice"][t]["alignment"] < adv["min_alignment"]
        assert adv["advice"][t]["helps"] == (not misaligned and adv["advice"][t]["verdict"] != "loses")
    # genre_rows ranks genres, every other task items: no shared candidate type or candidate ids
    assert adv["overlap"]["candidate_type"]["home"]["genre_rows"] == 0.0
    assert adv["overlap"]["candidate_set"]["home"]["genre_rows"] == 0.0
    assert adv["overlap"]["candidate_type"]["home"]["related"] == 1.0
    assert adv["overlap"]["candidate_set"]["home"]["related"] > 0.0


def test_the_benefit_and_grouping_agree_with_the_written_affinities(advice):
    _, _, adv = advice
    a = adv["normalised_affinity"]
    groups = adv["grouping"]["groups"]
    assert sorted(t for g in groups for t in g) == sorted(TASKS)  # a partition: every task once
    assert adv["grouping"]["searched"] == 52  # Bell(5)
    onto = {j: sum(a[i][j] for i in g if i != j) for g in groups for j in g}
    assert adv["grouping"]["score"] == pytest.approx(sum(onto.values()))
    if all(
        adv["advice"][t]["alignment"] is None or adv["advice"][t]["alignment"] >= adv["min_alignment"]
        for t in TASKS
    ):
        assert adv["grouping"]["score"] >= max(adv["grouping"]["one_model_score"], 0.0) - 1e-9
    for t in TASKS:
        rec = adv["advice"][t]
        assert rec["benefit"] == pytest.approx(sum(a[i][t] for i in TASKS if i != t))
        assert rec["onto_from_group"] == pytest.approx(onto[t])
        assert t in rec["group"] and rec["group"] in groups
        mates = [i for i in rec["group"] if i != t]
        assert rec["recommendation"].startswith("share one model with" if mates else "keep bespoke")
        # the predicted relative lift: the benefit times the headroom of the short run's validation metric
        assert adv["headroom_metric"] == "auc"  # conf/debug/toy.yaml validates by mean/auc
        short = rec["short_run_auc"]
        assert 0 < short <= 1 and rec["headroom"] == pytest.approx((1 - short) / short)
        assert rec["predicted_lift"] == pytest.approx(rec["benefit"] * (1 - short) / short)


def test_markdown_and_heatmap_are_written(advice):
    _, out, adv = advice
    md = (out / "advice.md").read_text()
    for t in TASKS:
        assert f"| {t} | {adv['advice'][t]['benefit']:+.3f}" in md and f"- **{t}**:" in md
    assert "Recommended grouping" in md and "![affinity heatmaps](advice.png)" in md
    assert (out / "advice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
