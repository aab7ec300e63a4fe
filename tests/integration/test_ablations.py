"""The ablation report script: stage 2 and the recommendation on fake runs (fast), a missing option failing
by name (fast), and the script end to end on tiny data (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from tests.conftest import ROOT
from tests.unit.test_movielens import write_grouplens
from unirec.experiments import ablations as core
from unirec.experiments.suites import Suite


def _script():
    name = "ablations"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "ablations.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _fake_run(suite, variant, pinned, seed, work, args, log, wait=True):
    """Additive validation gains (mmoe +0.01, uniform +0.02), so the combination wins validation; on test
    the combination loses task b to the baseline."""
    ch = dict(variant.changes)
    mmoe, uniform = ch.get("model.tower") == "mmoe", ch.get("loader.mix") == "uniform"
    jitter = 0.001 * seed
    b = 0.4 + 0.005 * mmoe - 0.03 * (mmoe and uniform)
    return {
        "seed": seed,
        "run": f"{work}/{variant.slug}-s{seed}",
        "valid": 0.5 + 0.01 * mmoe + 0.02 * uniform + jitter,
        "best_step": 10,
        "steps": 10,
        "wall_seconds": 10.0 + 5 * mmoe,
        "parameters": 1000 + 200 * mmoe,
        "test": {
            "a": {"ndcg@10": 0.6 + 0.01 * mmoe + 0.01 * uniform + jitter, "recall@10": 0.9},
            "b": {"ndcg@10": b + jitter, "recall@10": 0.8},
        },
        "popularity": {"a": 0.55, "b": 0.35},
    }


def test_combination_and_trade_off_on_fake_runs(tmp_path, monkeypatch):
    ab = _script()
    monkeypatch.setattr(core, "train_and_test", _fake_run)
    suite = Suite("synthetic", "fake", [], {"a": "a", "b": "b"}, "sampled", ("sampled",), 1, [])
    variants = core.select_variants(["tower=mmoe", "sampling"])
    assert [v.name for v in variants] == ["tower=mmoe", "sampling=uniform", "sampling=temperature"]
    args = Namespace(work=str(tmp_path / "work"), seeds=[0, 1], quick=False)
    res = core.run_suite(
        suite, variants, {"model.tower": "cross", "loader.mix": "natural"}, ["data.impute"], args
    )
    assert res["winners"]["tower"]["name"] == "tower=mmoe"
    assert res["winners"]["sampling"]["name"] == "sampling=uniform"
    assert res["combination"]["trained"]
    rec = res["recommended"]
    assert rec["name"] == "combination" and rec["losing"] == ["b"]
    assert rec["overrides"] == "model.tower=mmoe loader.mix=uniform"
    out = tmp_path / "reports" / "synthetic"
    out.mkdir(parents=True)
    (out / "ablations.json").write_text(json.dumps(res))
    ab.main(["--render", "--suites", "synthetic", "--out", str(tmp_path / "reports")])
    md = (out / "ablations.md").read_text()
    assert "**Trade-off:** it is below the baseline on 1 of 2 tasks: b by 0.0250 (6.2%)" in md
    assert "model.tower=mmoe loader.mix=uniform" in md and "not pinned: data.impute" in md
    assert "| combination | **combination** |" in md


def test_an_option_this_version_lacks_fails_naming_the_variant(tmp_path, monkeypatch):
    ab = _script()
    monkeypatch.setitem(core.BASELINE, "model.no_such_option", "a")
    monkeypatch.setitem(core.AXES, "bogus", ("model.no_such_option", ("b",)))
    with pytest.raises(SystemExit, match="variant bogus=b .*model.no_such_option=b"):
        ab.main(["--quick", "--suites", "synthetic", "--variants", "bogus", "--work", str(tmp_path / "w"),
                 "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert not (tmp_path / "w").exists()  # nothing trained


def test_a_value_the_model_rejects_fails_before_training(tmp_path, monkeypatch):
    ab = _script()
    monkeypatch.setitem(core.AXES, "tower", ("model.tower", ("no_such_tower",)))
    with pytest.raises(SystemExit, match="variant tower=no_such_tower .*model.tower='no_such_tower'"):
        ab.main(["--quick", "--suites", "synthetic", "--variants", "tower", "--work", str(tmp_path / "w"),
                 "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_quick_ablations_report(tmp_path):
    raw = write_grouplens(tmp_path / "ml-100k", n_users=60, n_items=80)
    out = tmp_path / "reports"
    cmd = [sys.executable, str(ROOT / "scripts" / "ablations.py"), "--quick", "--raw-dir", str(raw),
           "--variants", "tower=mmoe", "sampling=uniform", "--work", str(tmp_path / "work"),
           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--jobs", "2", "--fresh"]  # fmt: skip
    (tmp_path / "work" / "ml100k" / "stale-s0").mkdir(parents=True)  # --fresh deletes it, once
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp_path / "work" / "ml100k" / "stale-s0").exists()
    helper = (tmp_path / "work" / "helper-1.log").read_text()  # --jobs 2: the helper took its share
    trained = [
        ln for ln in (proc.stdout + helper).splitlines() if " seed 0: train " in ln and "(reused)" not in ln
    ]
    assert "helper done" in helper, helper  # how many runs it took depends on timing: no more asserted
    names = [(ln[1:].split()[0], ln.split("]", 1)[1].split()[0]) for ln in trained]  # (suite, variant)
    assert sorted(names) == sorted(set(names)), "a run trained twice: " + "\n".join(trained)
    for suite in ("ml100k", "synthetic"):
        res = json.loads((out / suite / "ablations.json").read_text())
        tasks = res["tasks"]
        if suite == "ml100k":
            assert tasks == ["home", "related", "search", "genre"]
        assert len(tasks) >= 4
        names = [e["name"] for e in res["entries"]]
        assert names[:3] == ["baseline", "tower=mmoe", "sampling=uniform"]
        for e in res["entries"]:
            assert len(e["runs"]) == 1 and e["runs"][0]["parameters"] > 0 and e["runs"][0]["wall_seconds"] > 0
            for t in tasks:
                assert 0.0 <= e["runs"][0]["test"][t]["ndcg@10"] <= 1.0
        md = (out / suite / "ablations.md").read_text()
        table = [ln for ln in md.split("## Results")[1].split("\n\n")[1].splitlines() if ln.startswith("|")]
        assert table[0].startswith("| axis | variant | " + " | ".join(tasks) + " | mean over tasks |")
        # a variant cell is "x" or, for an axis winner, "**x** (axis winner)"
        rows = {ln.split("|")[2].replace("*", "").split()[0]: ln.split("|") for ln in table[2:]}
        for name in names:
            for cell in rows[name][3 : 3 + len(tasks) + 1]:  # each task and the mean over tasks
                assert 0.0 <= float(cell.split("±")[0]) <= 1.0
        rec = res["recommended"]["name"]
        assert rec in names
        assert f"**{rec}**" in md.split("## Recommended default")[1].split("\n\n")[1]
        assert f"{suite}: recommended default {rec}" in proc.stdout
