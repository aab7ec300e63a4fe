"""loss.balancing through ``python -m unirec.train`` on both built-in data sets (one multirun each), read back
from the real TensorBoard event files; and exact resume of the balancer state."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_train
from tests.unit.test_movielens import write_grouplens
from unirec.balancing import BALANCERS
from unirec.config import compose
from unirec.train import run

MOVIELENS_TASKS = ("home", "related", "search", "genre")
LOG_STEPS = [2, 4, 6]


def _scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("data", ["synthetic", "movielens"])
def test_every_balancing_trains_and_logs_weights_and_grad_norms(data, tmp_path):
    extra = []
    if data == "movielens":
        raw = write_grouplens(tmp_path / "ml-100k", n_users=40, n_items=60)
        extra = ["data=movielens", f"data.raw_dir={raw}",
                 "task=[" + ",".join(f"movielens/{t}" for t in MOVIELENS_TASKS) + "]"]  # fmt: skip
    proc = run_train(
        ["-m", f"loss.balancing={','.join(BALANCERS)}", "debug=toy", "trainer.max_steps=6", "trainer.eval_every=6",
         "trainer.log_every=2", "loader.batch_size=256", *extra, f"data.cache_dir={tmp_path / 'cache'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        tmp_path,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {}
    for i, balancing in enumerate(BALANCERS):
        run_dir = tmp_path / "sweep" / str(i)
        assert f"balancing: {balancing}" in (run_dir / "config.yaml").read_text()
        metrics = json.loads((run_dir / "metrics.json").read_text())
        tasks = sorted(metrics["valid"])
        assert metrics["steps"] == 6 and len(tasks) >= 2
        scalars = _scalars(run_dir)
        for task in tasks:
            for kind in ("loss", "weight", "grad_norm"):
                assert [s for s, _ in scalars[f"train/{task}/{kind}"]] == LOG_STEPS, (balancing, task, kind)
            assert all(v > 0 for _, v in scalars[f"train/{task}/grad_norm"]), (balancing, task)
        lines = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == LOG_STEPS and all(set(r["weights"]) == set(tasks) for r in lines)
        logged[balancing] = {t: [v for _, v in scalars[f"train/{t}/weight"]] for t in tasks}
    static = logged["static"]  # each task's loss_weight, unchanged all run
    assert all(len(set(ws)) == 1 for ws in static.values()), static
    k, lw_sum = len(static), sum(ws[0] for ws in static.values())
    for task, ws in static.items():
        # uncertainty starts at lw_k * exp(0); gradnorm at lw_k rescaled to sum K.
        for balancing, initial in (("uncertainty", ws[0]), ("gradnorm", ws[0] * k / lw_sum)):
            # Learned weights move (a weight may pass back through its initial value on one logged step).
            assert max(abs(w - initial) for w in logged[balancing][task]) > 1e-3, (balancing, task, initial)
    for step in range(len(LOG_STEPS)):
        assert sum(ws[step] for ws in logged["gradnorm"].values()) == pytest.approx(k, rel=1e-5)


@pytest.mark.parametrize("balancing, strip", [("uncertainty", False), ("gradnorm", False), ("static", True)])
def test_resume_restores_the_balancer_exactly(balancing, strip, tmp_path, toy_features, caplog):
    """A run rolled back to its step-5 checkpoint finishes exactly as the uninterrupted run; ``strip`` removes
    the balancer from that checkpoint, as one written before loss.balancing existed (static must resume)."""
    cfg = compose([f"loss.balancing={balancing}", "debug=toy", "trainer.max_steps=10", "trainer.checkpoint_every=5",
                   "trainer.eval_every=10", "trainer.log_every=1", "loader.batch_size=128"])  # fmt: skip
    ref, again = tmp_path / "ref", tmp_path / "again"
    run(cfg, ref, toy_features)
    shutil.copytree(ref, again)
    ckpts = again / "checkpoints"
    (ckpts / "latest").write_text("step-00000005")
    if strip:
        state = torch.load(ckpts / "step-00000005" / "state.pt", weights_only=True)
        del state["balancer"]
        torch.save(state, ckpts / "step-00000005" / "state.pt")
    with caplog.at_level(logging.INFO, logger="unirec.train"):
        run(cfg, again, toy_features)
    assert "(step 5)" in caplog.text  # resumed, not retrained from scratch (which would match too)
    final = "step-00000010"
    got, want = (load_file(str(d / "checkpoints" / final / "model.safetensors")) for d in (again, ref))
    assert all(torch.equal(got[k], want[k]) for k in want)
    got, want = (
        torch.load(d / "checkpoints" / final / "state.pt", weights_only=True)["balancer"]
        for d in (again, ref)
    )
    assert got["balancing"] == balancing and all(
        torch.equal(got["tensors"][k], v) for k, v in want["tensors"].items()
    )
    lines = [(d / "train_log.jsonl").read_text().splitlines() for d in (again, ref)]
    assert lines[0] == lines[1] and len(lines[0]) == 10
