"""The consolidation report script end to end, reduced: every suite, two seeds, one grid point, one epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.unit.test_movielens import write_grouplens

SUITES = {
    "ml100k": "ml100k",
    "synthetic-1.0": "synthetic/relatedness-1.0",
    "synthetic-0.0": "synthetic/relatedness-0.0",
}
TASKS = ("home", "related", "search", "genre")


@pytest.mark.slow
def test_reduced_consolidation_report(tmp_path):
    raw = write_grouplens(tmp_path / "ml-100k", n_users=60, n_items=80)
    out = tmp_path / "reports"
    cmd = [sys.executable, str(ROOT / "scripts" / "consolidation_report.py"), "--quick", "--raw-dir", str(raw),
           "--seeds", "2", "--lrs", "1e-2", "--sizes", "S", "--work", str(tmp_path / "work"),
           "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--jobs", "2"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    helper = (tmp_path / "work" / "helper-1.log").read_text()  # --jobs 2: the helper took its share
    assert helper.count("helper done") == len(SUITES) and "Traceback" not in helper, helper[-2000:]
    for suite, sub in SUITES.items():
        res = json.loads((out / sub / "consolidation.json").read_text())
        headline = "full" if suite == "ml100k" else "sampled"
        for task in TASKS:
            cell = res["test"][f"{headline}|{task}|ndcg@10"]
            assert len(cell["unified"]) == len(cell["bespoke"]) == len(cell["popularity"]) == 2
            assert len(cell["unified_own_step"]) == 2  # each task at its own best step of the joint run
            assert all(0.0 <= v <= 1.0 for v in cell["unified"] + cell["bespoke"])
        fp = res["footprint"]
        # four bespoke models, each with its own embedding tables, against one
        assert fp["parameters"][1] > fp["parameters"][0] > 0
        assert fp["artifact_bytes"][1] > fp["artifact_bytes"][0] > 0
        assert fp["serving_rss_mb"][1] > fp["serving_rss_mb"][0] > 0
        md = (out / sub / "consolidation.md").read_text()
        assert all(f"| {t} |" in md for t in TASKS) and "Footprint" in md and "Equal tuning" in md
        assert "each environment at its own task's best step" in md
        assert (out / sub / "consolidation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ml = (out / "ml100k" / "consolidation.md").read_text()
    assert "Full ranking" in ml and "HR@10" in ml
    res = json.loads((out / "ml100k" / "consolidation.json").read_text())
    assert len(res["test"]["full|home|ndcg@10"]["transitions"]) == 2  # requests with a history
    assert "transitions" not in res["test"]["full|related|ndcg@10"]  # no history in a related request
    # --render rewrites the report from the JSON alone, with the notes amended after the run
    res["amended"] = ["A note added after the run."]
    (out / "ml100k" / "consolidation.json").write_text(json.dumps(res))
    render = [sys.executable, str(ROOT / "scripts" / "consolidation_report.py"), "--suites", "ml100k",
              "--render", "--out", str(out)]  # fmt: skip
    assert subprocess.run(render, cwd=tmp_path, env=env, capture_output=True, timeout=300).returncode == 0
    assert "> A note added after the run." in (out / "ml100k" / "consolidation.md").read_text()


def test_the_run_lock_keeps_two_processes_off_one_run(tmp_path):
    """``--only-seeds`` workers share a work directory: a second process waits on a run another holds."""
    run = tmp_path / "work" / "unified-s0"
    order = tmp_path / "order.txt"
    code = (
        "import sys, time\n"
        "from unirec.experiments.runs import run_lock\n"
        "from pathlib import Path\n"
        f"with run_lock(Path({str(run)!r})):\n"
        f"    open({str(order)!r}, 'a').write(sys.argv[1] + ' in\\n')\n"
        "    time.sleep(float(sys.argv[2]))\n"
        f"    open({str(order)!r}, 'a').write(sys.argv[1] + ' out\\n')\n"
    )
    first = subprocess.Popen([sys.executable, "-c", code, "a", "4"], cwd=ROOT)
    for _ in range(200):  # until the first holds the lock
        if order.exists():
            break
        time.sleep(0.05)
    # A --jobs helper does not wait: it is told the run is held, and goes on to another.
    probe = (
        code.split("from pathlib")[0] + "from pathlib import Path\n"
        f"with run_lock(Path({str(run)!r}), wait=False) as mine:\n"
        "    sys.exit(0 if mine is False else 3)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=60).returncode == 0
    second = subprocess.run([sys.executable, "-c", code, "b", "0"], cwd=ROOT, timeout=60)
    assert first.wait(timeout=60) == 0 and second.returncode == 0
    assert order.read_text().split("\n")[:4] == ["a in", "a out", "b in", "b out"]
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, timeout=60).returncode == 3  # free now


@pytest.mark.slow
def test_reduced_report_from_equal_searches(tmp_path):
    """``--tuned``: every model kind searched with Hydra's Optuna sweeper on the same budget, and the report
    trains each kind's own best point, every seed, instead of a shared grid."""
    from tests.conftest import run_train

    raw = write_grouplens(tmp_path / "ml-100k", n_users=60, n_items=80)
    cache, searches = tmp_path / "cache", tmp_path / "searches"
    for kind, task in [("unified", []), *((f"bespoke-{t}", [f"task=[movielens/{t}]"]) for t in TASKS)]:
        proc = run_train(["-m", "hparams_search=ml100k_cpu", "experiment=ml100k", f"data.raw_dir={raw}",
                          f"data.cache_dir={cache}", f"hydra.sweep.dir={searches / kind}", "hydra.sweeper.n_trials=2",
                          "trainer.epochs=1", *task], tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "reports"
    cmd = [sys.executable, str(ROOT / "scripts" / "consolidation_report.py"), "--quick", "--suites", "ml100k",
           "--raw-dir", str(raw), "--seeds", "2", "--tuned", str(searches), "--work", str(tmp_path / "work"),
           "--out", str(out), "--cache-dir", str(cache)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "ml100k" / "consolidation.json").read_text())
    import yaml
    from omegaconf import OmegaConf

    for kind in ["unified", *(f"bespoke-{t}" for t in TASKS)]:
        best = yaml.safe_load((searches / kind / "optimization_results.yaml").read_text())
        assert (
            res["tuning"]["kinds"][kind]["params"] == best["best_params"]
            and res["chosen"][kind]["size"] == "tuned"
        )
        assert len(res["tuning"]["kinds"][kind]["trials"]) == 2
        for run in res["runs"][kind]:  # every seed trains the kind's own point
            cfg = OmegaConf.load(f"{run['run']}/config.yaml")
            assert cfg.model.dropout == best["best_params"]["model.dropout"]
            assert cfg.data.history.max_len == best["best_params"]["data.history.max_len"]
            assert cfg.optim.lr == pytest.approx(best["best_params"]["optim.lr"])
    assert len(res["test"]["full|home|ndcg@10"]["bespoke"]) == 2
    md = (out / "ml100k" / "consolidation.md").read_text()
    assert (
        "Equal tuning: 2 trials of a hyperparameter search per model kind" in md and "| bespoke-genre |" in md
    )
