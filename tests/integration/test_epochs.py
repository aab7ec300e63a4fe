"""Training by epochs with early stopping, each task's best step, and exporting one task's best."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from unirec import checkpoint
from unirec.config import compose
from unirec.export import ArtifactError, export, read_json
from unirec.train import run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, toy_features):
    # lr 0 never improves on the first validation, so patience 2 stops after the third epoch of 10.
    cfg = compose(["debug=toy", "trainer.epochs=10", "trainer.patience=2", "optim.lr=0",
                   "optim.warmup_steps=0", "trainer.best_metric=mean/ndcg@10", "loader.batch_size=2048"])  # fmt: skip
    run_dir = tmp_path_factory.mktemp("epochs")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # as the CLI writes it
    return cfg, run_dir, run(cfg, run_dir, toy_features)


def test_epochs_set_the_length_and_patience_stops_the_run(stopped):
    cfg, run_dir, m = stopped
    epoch = m["steps_per_epoch"]
    assert m["max_steps"] == 10 * epoch and m["stopped_early"] is True
    assert m["steps"] == 3 * epoch and m["best"]["step"] == epoch
    logged = [json.loads(ln)["step"] for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert max(logged) == 3 * epoch


def test_each_task_best_step_is_recorded_and_pointed_at(stopped):
    cfg, run_dir, m = stopped
    tasks = m["best"]["tasks"]
    assert set(tasks) == set(cfg.task)
    ckpts = run_dir / "checkpoints"
    for task, best in tasks.items():
        pointer = ckpts / checkpoint.best_pointer(task)
        assert pointer.read_text().strip() == f"step-{best['step']:08d}"
        assert (ckpts / pointer.read_text().strip() / "model.safetensors").exists()


def test_export_best_of_one_task_and_a_clear_error_for_an_unknown_one(stopped, tmp_path):
    _, run_dir, m = stopped
    version = export(run_dir, tmp_path / "registry", "best:home")
    assert read_json(version / "manifest.json")["source"]["step"] == m["best"]["tasks"]["home"]["step"]
    with pytest.raises(ArtifactError, match=r"best:nope.*best:home"):
        export(run_dir, tmp_path / "registry", "best:nope")


def test_full_valid_protocol_matches_the_evaluate_cli_and_picks_the_best_step(tmp_path, toy_features):
    from unirec import evaluate

    cfg = compose(["debug=toy", "trainer.epochs=3", "trainer.valid_protocol=full",
                   "trainer.best_metric=mean/ndcg@10", "trainer.keep_checkpoints=5", "loader.batch_size=2048"])  # fmt: skip
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    m = run(cfg, tmp_path, toy_features)
    # The last validation is the last checkpoint's full ranking on valid, as unirec.evaluate computes it.
    cli = evaluate.run(tmp_path, "valid", ("full",), checkpoint="latest")["protocols"]["full"]
    for task, scores in m["valid"].items():
        assert set(scores) == {"ndcg@10", "recall@10", "mrr"}
        for metric, value in scores.items():
            assert value == pytest.approx(cli["model"][task][metric], abs=1e-9), (task, metric)
            assert m["popularity"][task][metric] == pytest.approx(cli["popularity"][task][metric], abs=1e-9)
    # The best step is the one whose full-ranking mean ndcg@10 is highest, as evaluate sees it.
    epoch = m["steps_per_epoch"]
    means = {}
    for step in range(epoch, 3 * epoch + 1, epoch):
        full = evaluate.run(tmp_path, "valid", ("full",), checkpoint=f"step-{step:08d}", popularity=False)
        scores = full["protocols"]["full"]["model"]
        means[step] = sum(s["ndcg@10"] for s in scores.values()) / len(scores)
    assert m["best"]["step"] == max(means, key=means.get)
    assert m["best"]["value"] == pytest.approx(max(means.values()), abs=1e-9)


def test_full_valid_protocol_needs_a_metric_it_computes():
    from unirec.train import check

    with pytest.raises(ValueError, match=r"trainer.best_metric='mean/auc'.*valid_protocol=full"):
        check(compose(["debug=toy", "trainer.valid_protocol=full"]))


def test_the_report_serves_each_task_at_its_own_best_step(tmp_path, toy_features):
    """The consolidation report's per-task-step figures: a task whose ``best:<task>`` is not the best-mean
    checkpoint is evaluated there, the others keep the run's own evaluation."""
    from unirec import evaluate
    from unirec.experiments import runs as report

    cfg = compose(["debug=toy", "trainer.epochs=2", "trainer.best_metric=mean/ndcg@10", "trainer.keep_checkpoints=5",
                   "loader.batch_size=2048"])  # fmt: skip
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    m = run(cfg, tmp_path, toy_features)
    ckpts = tmp_path / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step-*"))
    best = (ckpts / checkpoint.BEST).read_text().strip()
    other = next(s for s in steps if s != best)
    tasks = list(cfg.task)
    moved, kept = tasks[0], tasks[1:]
    for t in tasks:  # one task's best step elsewhere, the others on the best-mean checkpoint
        (ckpts / checkpoint.best_pointer(t)).write_text(other if t == moved else best)
    own = report.per_task(tmp_path, tasks, ("full",))
    assert own["best"] == best and own["steps"][moved] == other and set(own["figures"]) == {other}
    assert set(own["figures"][other]["full"]) == {moved}  # only the task served from that step is evaluated
    res = {**evaluate.run(tmp_path, "test", ("full",), popularity=False), "per_task": own}
    there = evaluate.run(tmp_path, "test", ("full",), checkpoint=other, popularity=False)
    assert report.at_own_step(res, "full", moved) == there["protocols"]["full"]["model"][moved]
    assert there["protocols"]["full"]["model"][moved] != res["protocols"]["full"]["model"][moved]
    for t in kept:
        assert report.at_own_step(res, "full", t) == res["protocols"]["full"]["model"][t]
    assert m["best"]["step"] == int(best.split("-")[1])
    assert report.per_task(tmp_path, tasks, ("full",)) == own  # cached beside the run


def test_evaluate_one_task_gives_that_task_s_figures_of_all(tmp_path, toy_features):
    from unirec import evaluate

    cfg = compose(["debug=toy", "trainer.epochs=1", "loader.batch_size=2048"])
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    run(cfg, tmp_path, toy_features)
    every = evaluate.run(tmp_path, "test", ("full", "sampled"))["protocols"]
    task = list(cfg.task)[-1]
    one = evaluate.run(tmp_path, "test", ("full", "sampled"), tasks=[task])["protocols"]
    # The sampled popularity's tie-breaking jitter is drawn in task order, so only its full ranking is
    # the same figure whichever tasks are evaluated.
    for protocol, who in (("full", "model"), ("full", "popularity"), ("sampled", "model")):
        assert set(one[protocol][who]) == {task}
        assert one[protocol][who][task] == pytest.approx(every[protocol][who][task], abs=1e-12)
    with pytest.raises(ValueError, match=r"\['nope'\] are not tasks of"):
        evaluate.run(tmp_path, "test", ("full",), tasks=["nope"])
