"""``python -m unirec.train`` end to end in real subprocesses: outputs, TensorBoard, overrides, errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_train

TASKS = ("home", "related", "search", "genre", "genre_rows")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache):
    cwd = tmp_path_factory.mktemp("cwd")
    run_dir = cwd / "run"
    # Progress on (debug=toy turns it off), a plain line every step: the output is captured, not a terminal.
    args = ["trainer.progress=true", "trainer.progress_every_s=0", "model.embedding_dim=32"]
    proc = run_train(["debug=toy", f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}", *args], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, run_dir


def _scalars(run_dir):
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


def test_tensorboard_has_per_task_loss_and_valid_auc(default_run):
    _, run_dir = default_run
    ea = _scalars(run_dir)
    tags = set(ea.Tags()["scalars"])
    for task in TASKS:
        assert f"train/{task}/loss" in tags and f"valid/{task}/auc" in tags, sorted(tags)
        assert {f"valid/{task}/ndcg@10", f"valid/{task}/recall@10", f"valid/{task}/mrr"} <= tags
        losses = [e.value for e in ea.Scalars(f"train/{task}/loss")]
        assert all(np.isfinite(losses)) and len(losses) >= 2
    assert ea.Tags()["tensors"] or "hparam/home/auc" in tags  # the run's hyperparameters were logged


def test_metrics_json_table_and_checkpoint(default_run):
    proc, run_dir = default_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["valid"]) == set(TASKS) == set(metrics["popularity"])
    for task in TASKS:
        assert 0.0 <= metrics["valid"][task]["auc"] <= 1.0
    assert "valid metrics: model (popularity)" in proc.stdout
    for task in TASKS:
        assert f"\n{task}" in proc.stdout
    assert (run_dir / "checkpoints" / "latest").exists()
    assert "embedding_dim: 32" in (run_dir / "config.yaml").read_text()


def test_captured_log_has_plain_progress_lines_not_bar_redraws(default_run):
    proc, _ = default_run
    assert "\r" not in proc.stdout and "\r" not in proc.stderr  # tqdm redraws with carriage returns
    lines = [line for line in proc.stderr.splitlines() if line.startswith("progress ")]
    assert len(lines) == 30, proc.stderr[-2000:]  # trainer.progress_every_s=0: one per step of debug=toy
    assert lines[-1].startswith("progress 30/30 (100%)") and "loss=" in lines[-1]


def test_two_tasks_only(tmp_path, cache):
    proc = run_train(
        [
            "debug=toy",
            f"data.cache_dir={cache}",
            f"hydra.run.dir={tmp_path}/r",
            "task=[home,search]",
            "trainer.max_steps=10",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(metrics["valid"]) == {"home", "search"} and metrics["steps"] == 10


def test_multirun_sweep(tmp_path, cache):
    proc = run_train(
        [
            "-m",
            "debug=toy",
            f"data.cache_dir={cache}",
            f"hydra.sweep.dir={tmp_path}/sweep",
            "trainer.max_steps=4",
            "optim.lr=0.001,0.003",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2


def test_optuna_search_maximises_the_best_validation_metric(tmp_path, cache):
    """hparams_search=ml100k's Optuna sweeper on the toy data: each trial returns its best validation
    mean ndcg@10, and the recorded best is the largest of them."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_train(
        ["-m", "hparams_search=ml100k", "debug=toy", f"data.cache_dir={cache}", f"hydra.sweep.dir={tmp_path}/sweep",
         "hydra.sweeper.n_trials=3", "trainer.epochs=1", "loader.batch_size=512"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/metrics.json"))]
    assert len(trials) == 3 and all(t["best"]["metric"] == "mean/ndcg@10" for t in trials)
    import yaml

    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t["best"]["value"] for t in trials))
    assert {"optim.lr", "loss.negatives", "model.sequence_pooling"} <= set(best["best_params"])
    # the consolidation report's --tuned reads the search back: its point, every trial, the trials' length
    import shutil

    from unirec.experiments.consolidation import tuned_points

    found = tuned_points(tmp_path, ["sweep"])["sweep"]
    assert found["params"] == best["best_params"] and found["best_valid"] == pytest.approx(best["best_value"])
    assert found["trials"] == [t["best"]["value"] for t in trials] and found["trainer"]["epochs"] == 1
    assert f"optim.lr={best['best_params']['optim.lr']}" in found["overrides"]
    shutil.copytree(tmp_path / "sweep", tmp_path / "short")
    (tmp_path / "short" / "2" / "metrics.json").unlink()  # one trial fewer: no equal tuning
    with pytest.raises(ValueError, match=r"unequal tuning budgets.*'sweep': 3, 'short': 2"):
        tuned_points(tmp_path, ["sweep", "short"])
    with pytest.raises(
        FileNotFoundError, match=r"absent/optimization_results.yaml: no finished search for absent"
    ):
        tuned_points(tmp_path, ["sweep", "absent"])


def test_misspelt_key_fails_naming_it(tmp_path, cache):
    proc = run_train(["debug=toy", f"data.cache_dir={cache}", "model.embeding_dim=32"], tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "embeding_dim" in proc.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))


NOTIFY_YAML = """\
# A fifth use case, declared by configuration alone: push notifications, with a device context field.
notify:
  id: 7
  context:
    user: {{kind: categorical}}
    device: {{kind: categorical}}
  labels: {{source: impressions}}
  adapter:
    source: {source}
    request: push_id
    candidate: vid
    label: opened
    timestamp: sent_at
    timestamp_unit: s
    context: {{user: member, device: device_kind}}
"""


def _notify_logs(path, n_requests=300, slate=8, n_items=200, n_users=300, start=1_700_000_000):
    rng = np.random.default_rng(5)
    rows = n_requests * slate
    req = np.repeat(np.arange(n_requests), slate)
    device = np.array(["ios", "android", "web"])[rng.integers(0, 3, n_requests)][req]
    vid = rng.integers(1, n_items + 1, rows)
    # opened depends on device and item parity, so there is something to learn
    p = 0.1 + 0.5 * ((vid % 2 == 0) & (device != "web"))
    path.mkdir(parents=True)
    pq.write_table(
        pa.table({
            "push_id": pa.array([f"p{r}" for r in req]),
            "member": pa.array(rng.integers(1, n_users + 1, n_requests)[req]),
            "device_kind": pa.array(device),
            "vid": pa.array(vid),
            "opened": pa.array((rng.random(rows) < p).astype(np.int8)),
            "sent_at": pa.array(start + np.sort(rng.integers(0, 27 * 86400, n_requests))[req]),
        }),
        path / "part-00000.parquet",
    )  # fmt: skip


def test_fifth_task_by_configuration_alone(tmp_path, cache):
    logs = tmp_path / "notify_logs"
    _notify_logs(logs)
    conf = tmp_path / "extra_conf" / "task"
    conf.mkdir(parents=True)
    (conf / "notify.yaml").write_text(NOTIFY_YAML.format(source=logs))
    proc = run_train([
        "debug=toy", f"data.cache_dir={cache}", f"hydra.run.dir={tmp_path}/r",
        f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]", "task=[home,related,search,genre,genre_rows,notify]",
    ], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert set(metrics["valid"]) == {*TASKS, "notify"}
    assert set(metrics["valid"]["notify"]) == {"auc", "ndcg@10", "recall@10", "mrr"}
    spec = json.loads((tmp_path / "r" / "metrics.json").read_text())["features"]
    feature_spec = json.loads(open(f"{spec}/feature_spec.json").read())
    assert "device" in feature_spec["context"] and feature_spec["tasks"]["notify"]["id"] == 7
    ea = _scalars(tmp_path / "r")
    assert "train/notify/loss" in ea.Tags()["scalars"]
