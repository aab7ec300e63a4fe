"""MovieLens canvases through the real pipeline: prepare is deterministic and leak-free, and trains end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, run_train
from tests.unit.test_movielens import write_grouplens
from unirec.config import compose
from unirec.data import labels
from unirec.data.prepare import prepare

TASKS = ("home", "related", "search", "genre")
ML_TASKS = "task=[" + ",".join(f"movielens/{t}" for t in TASKS) + "]"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_grouplens(tmp_path_factory.mktemp("ml") / "ml-100k", n_users=60, n_items=80)


def _cfg(source, cache, *extra):
    return compose(["data=movielens", f"data.raw_dir={source}", ML_TASKS, f"data.cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    cfg = _cfg(source, tmp_path_factory.mktemp("cache-a"))
    return prepare(cfg.data, cfg.task, cfg.seed).parent


def test_same_seed_gives_byte_identical_prepared_data(source, prepared, tmp_path):
    cfg = _cfg(source, tmp_path / "cache-b")
    again = prepare(cfg.data, cfg.task, cfg.seed).parent
    files = sorted(p.relative_to(prepared) for p in prepared.rglob("*") if p.is_file())
    assert len(files) > 20 and files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    differ = [str(f) for f in files if (prepared / f).read_bytes() != (again / f).read_bytes()]
    assert not differ
    other = _cfg(source, tmp_path / "cache-c", "seed=1")
    seeded = prepare(other.data, other.task, other.seed).parent
    f = "labeled/split=train/task=home/part-00000.parquet"
    assert (seeded / f).read_bytes() != (prepared / f).read_bytes()


def _positives(prepared, split, task):
    t = pq.read_table(prepared / "labeled" / f"split={split}" / f"task={task}")
    return t.filter(pc.equal(t[labels.LABEL], 1))


def test_no_valid_or_test_event_in_train(prepared):
    held_out = {}  # user -> (items, earliest time) of their valid and test events
    for task in ("home", "search", "genre"):  # the tasks whose requests carry the user
        for s in ("valid", "test"):
            p = _positives(prepared, s, task)
            for u, i, ts in zip(
                p["user"].to_pylist(), p[labels.CANDIDATE].to_pylist(), p[labels.TIMESTAMP].to_pylist()
            ):
                items, t0 = held_out.get(u, (set(), ts))
                held_out[u] = (items | {i}, min(t0, ts))
    assert held_out
    for task in ("home", "search", "genre"):
        p = _positives(prepared, "train", task)
        for u, i, ts in zip(
            p["user"].to_pylist(), p[labels.CANDIDATE].to_pylist(), p[labels.TIMESTAMP].to_pylist()
        ):
            items, t0 = held_out[u]
            assert i not in items and ts <= t0, (task, u, i)
    # related has no user: its held-out (source item, item, time) triples never appear in its train either
    key = [("source_item", labels.CANDIDATE, labels.TIMESTAMP)]
    train = set(zip(*(_positives(prepared, "train", "related")[c].to_pylist() for c in key[0])))
    for s in ("valid", "test"):
        held = set(zip(*(_positives(prepared, s, "related")[c].to_pylist() for c in key[0])))
        assert held and not held & train
    # every held-out event is a request on every task, and the labeled splits are the derivation's
    raw = {t: pq.read_table(prepared / "raw" / t) for t in TASKS}
    for task in TASKS:
        for s in labels.SPLITS:
            lab = pq.read_table(prepared / "labeled" / f"split={s}" / f"task={task}")
            assert lab.num_rows == pc.sum(pc.equal(raw[task]["split"], s)).as_py() > 0
            assert labels.SPLIT not in lab.column_names
        if task != "related":
            assert len(_positives(prepared, "test", task)) == len(held_out)
    assert json.loads((prepared / "rejects.json").read_text()) == {t: {} for t in TASKS}


def test_train_on_movielens_end_to_end(source, tmp_path):
    proc = run_train(
        [
            "data=movielens",
            f"data.raw_dir={source}",
            ML_TASKS,
            "debug=toy",
            "trainer.max_steps=10",
            "trainer.eval_every=10",
            "loader.batch_size=256",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["valid"]) == set(TASKS) and metrics["steps"] == 10
    for task in TASKS:
        assert 0.0 <= metrics["valid"][task]["auc"] <= 1.0
    assert "movielens canvases:" in proc.stdout

    # python -m unirec.evaluate on the run, then on its exported artifact: the same figures
    out = tmp_path / "eval.json"
    ev = _module(["unirec.evaluate", str(tmp_path / "run"), "--split", "test", "--out", str(out)], tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["protocols"]) == {"full", "sampled"}
    for who in ("model", "popularity"):
        for task in TASKS:
            full = res["protocols"]["full"][who][task]
            assert full["requests"] > 0 and 0.0 <= full["ndcg@10"] <= full["recall@10"] <= 1.0
            assert 0.0 < full["mrr"] <= 1.0
            assert 0.0 <= res["protocols"]["sampled"][who][task]["ndcg@10"] <= 1.0
    # the held-out event of every user is one request per task, full ranking included
    assert res["protocols"]["full"]["model"]["home"]["requests"] == 60
    art = _module(
        ["unirec.export", str(tmp_path / "run"), "--registry", str(tmp_path / "reg"), "--checkpoint", "best"],
        tmp_path,
    )
    assert art.returncode == 0, art.stderr[-3000:]
    out2 = tmp_path / "eval-artifact.json"
    ev2 = _module(
        ["unirec.evaluate", str(tmp_path / "reg" / "v000001"), "--protocol", "full", "--out", str(out2)],
        tmp_path,
    )
    assert ev2.returncode == 0, ev2.stderr[-3000:]
    assert json.loads(out2.read_text())["protocols"]["full"] == res["protocols"]["full"]
    bad = _module(["unirec.evaluate", str(tmp_path / "nowhere")], tmp_path)
    assert bad.returncode == 2 and "nowhere" in bad.stderr


def _module(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_movielens_needs_raw_dir(tmp_path):
    cfg = compose(["data=movielens", ML_TASKS, f"data.cache_dir={tmp_path}"])
    with pytest.raises(ValueError, match="data.raw_dir"):
        prepare(cfg.data, cfg.task, cfg.seed)
