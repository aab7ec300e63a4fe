"""Every tower trains on both built-in data sets through ``python -m unirec.train`` (one multirun each)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_train
from tests.unit.test_movielens import write_grouplens
from unirec.model.towers import TOWERS

TASKS = ("home", "related", "search", "genre")


@pytest.mark.parametrize("data", ["synthetic", "movielens"])
def test_every_tower_trains_through_the_entry_point(data, tmp_path):
    extra, tasks = [], (*TASKS, "genre_rows")  # the synthetic canvases also rank genres
    if data == "movielens":
        tasks = TASKS
        raw = write_grouplens(tmp_path / "ml-100k", n_users=40, n_items=60)
        extra = [
            "data=movielens",
            f"data.raw_dir={raw}",
            "task=[" + ",".join(f"movielens/{t}" for t in TASKS) + "]",
        ]
    proc = run_train(
        ["-m", f"model.tower={','.join(TOWERS)}", "debug=toy", "trainer.max_steps=6", "trainer.eval_every=6",
         "loader.batch_size=256", *extra, f"data.cache_dir={tmp_path / 'cache'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, tower in enumerate(TOWERS):
        run = tmp_path / "sweep" / str(i)
        assert f"tower: {tower}" in (run / "config.yaml").read_text()
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["steps"] == 6 and set(metrics["valid"]) == set(tasks)
        assert all(0.0 <= metrics["valid"][t]["auc"] <= 1.0 for t in tasks)
