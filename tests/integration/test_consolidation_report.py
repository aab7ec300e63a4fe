"""The consolidation report script end to end, reduced: every suite, two seeds, one grid point, one epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
           "--out", str(out), "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for suite, sub in SUITES.items():
        res = json.loads((out / sub / "consolidation.json").read_text())
        headline = "full" if suite == "ml100k" else "sampled"
        for task in TASKS:
            cell = res["test"][f"{headline}|{task}|ndcg@10"]
            assert len(cell["unified"]) == len(cell["bespoke"]) == len(cell["popularity"]) == 2
            assert all(0.0 <= v <= 1.0 for v in cell["unified"] + cell["bespoke"])
        fp = res["footprint"]
        # four bespoke models, each with its own embedding tables, against one
        assert fp["parameters"][1] > fp["parameters"][0] > 0
        assert fp["artifact_bytes"][1] > fp["artifact_bytes"][0] > 0
        assert fp["serving_rss_mb"][1] > fp["serving_rss_mb"][0] > 0
        md = (out / sub / "consolidation.md").read_text()
        assert all(f"| {t} |" in md for t in TASKS) and "Footprint" in md and "Equal tuning" in md
        assert (out / sub / "consolidation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ml = (out / "ml100k" / "consolidation.md").read_text()
    assert "Full ranking" in ml and "HR@10" in ml
