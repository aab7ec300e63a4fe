"""Faults for real: SIGKILL mid-run and mid-checkpoint, NaN steps, non-finite checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_train
from unirec import checkpoint
from unirec.config import compose
from unirec.model import MultiTaskRanker
from unirec.train import NonFiniteError, run, setup, train_step

ARGS = ["debug=toy", "trainer.max_steps=40", "trainer.checkpoint_every=5", "trainer.eval_every=20",
        "trainer.log_every=1", "loader.batch_size=256"]  # fmt: skip


def _popen(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "unirec.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(cond, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"training exited early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def _log_lines(run_dir):
    path = run_dir / "train_log.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _weights(run_dir):
    return load_file(str(checkpoint.latest(run_dir / "checkpoints") / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its final weights and per-step losses are what every resumed run must match."""
    tmp = tmp_path_factory.mktemp("ref")
    cache = tmp_path_factory.mktemp("cache")
    proc = run_train([*ARGS, f"data.cache_dir={cache}", f"hydra.run.dir={tmp}/run"], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cache, tmp / "run"


def _assert_same_run(run_dir, ref_dir):
    got, want = _weights(run_dir), _weights(ref_dir)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "weights differ from the uninterrupted run"
    steps = [json.loads(x) for x in _log_lines(run_dir)]
    ref = [json.loads(x) for x in _log_lines(ref_dir)]
    assert [s["step"] for s in steps] == list(range(1, 41))
    assert [s["loss"] for s in steps] == [s["loss"] for s in ref]


def test_sigkill_at_a_random_step_resumes_bitwise(tmp_path, reference):
    cache, ref_dir = reference
    run_dir = tmp_path / "run"
    args = [*ARGS, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    kill_at = random.Random().randint(7, 33)
    proc = _popen(args, tmp_path)
    _wait_for(lambda: len(_log_lines(run_dir)) >= kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_log_lines(run_dir)) < 40, "the run finished before it could be killed"
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_run(run_dir, ref_dir)


def test_kill_during_checkpoint_write_resumes_from_previous(tmp_path, reference):
    cache, ref_dir = reference
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    args = [*ARGS, f"data.cache_dir={cache}", f"hydra.run.dir={run_dir}"]
    proc = _popen(args, tmp_path, {"UNIREC_CHECKPOINT_DELAY_S": "0.5"})
    _wait_for(lambda: (ckpts / "latest").exists() and list(ckpts.glob(".tmp-*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = list(ckpts.glob(".tmp-*"))
    assert partial and not (partial[0] / "trainer.json").exists()  # killed mid-write
    assert checkpoint.latest(ckpts).name == "step-00000005"  # still the previous, complete one
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-00000005" in proc.stdout
    assert not list(ckpts.glob(".tmp-*"))
    _assert_same_run(run_dir, ref_dir)


def _nan_after(monkeypatch, calls_before_nan, until=None):
    """Make the model's training forward return NaN from the (calls_before_nan+1)-th call on."""
    original = MultiTaskRanker.forward
    count = {"n": 0}

    def forward(self, batch):
        out = original(self, batch)
        if self.training:
            count["n"] += 1
            if count["n"] > calls_before_nan and (until is None or count["n"] <= until):
                return out * float("nan")
        return out

    monkeypatch.setattr(MultiTaskRanker, "forward", forward)


def test_nan_step_is_skipped_and_leaves_everything_unchanged(monkeypatch, toy_features):
    cfg = compose(["debug=toy", "loader.prefetch=0", "loader.batch_size=128"])
    tr = setup(cfg, toy_features)
    assert train_step(tr, tr.loader.next_batch())[3]
    before = {k: v.clone() for k, v in tr.module.state_dict().items()}
    moments = {k: v.clone() for k, v in tr.opts[0].state_dict()["state"][0].items()}
    epoch = tr.scheds[0].last_epoch
    _nan_after(monkeypatch, 0)
    loss, _, _, stepped, _ = train_step(tr, tr.loader.next_batch())
    assert not stepped and not torch.isfinite(loss)
    assert all(torch.equal(before[k], v) for k, v in tr.module.state_dict().items())
    assert all(torch.equal(moments[k], v) for k, v in tr.opts[0].state_dict()["state"][0].items())
    assert tr.scheds[0].last_epoch == epoch


def test_nan_steps_counted_then_k_in_a_row_stop(monkeypatch, tmp_path, toy_features):
    cfg = compose(["debug=toy", "trainer.max_steps=20", "trainer.max_nonfinite=3", "trainer.checkpoint_every=2",
                   "trainer.log_every=1", "trainer.eval_every=100"])  # fmt: skip
    _nan_after(monkeypatch, 4, until=6)  # steps 5 and 6 are NaN, then training recovers
    metrics = run(cfg, tmp_path / "ok", toy_features)
    assert metrics["nonfinite_skipped"] == 2
    log = [json.loads(x) for x in (tmp_path / "ok" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if not r["stepped"]] == [5, 6]

    _nan_after(monkeypatch, 4)  # every step from 5 on
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps up to step 7"):
        run(cfg, tmp_path / "bad", toy_features)
    for ckpt in (tmp_path / "bad" / "checkpoints").glob("step-*"):
        assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())


def test_non_finite_weights_are_never_written(tmp_path, toy_features):
    tr = setup(compose(["debug=toy"]), toy_features)
    with torch.no_grad():
        next(tr.module.parameters()).fill_(float("inf"))
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        checkpoint.save(tmp_path, 1, tr.module, {}, {"loader": []})
    assert checkpoint.latest(tmp_path) is None and not list(tmp_path.glob("step-*"))


def test_retention_keeps_the_newest_and_the_best(tmp_path, toy_features):
    cfg = compose(["debug=toy", "trainer.max_steps=20", "trainer.eval_every=5", "trainer.checkpoint_every=5",
                   "trainer.keep_checkpoints=1", "trainer.best_metric=home/auc"])  # fmt: skip
    metrics = run(cfg, tmp_path, toy_features)
    ckpts = tmp_path / "checkpoints"
    best = metrics["best"]
    assert best["metric"] == "home/auc" and best["step"] in (5, 10, 15, 20)
    assert (ckpts / "best").read_text() == f"step-{best['step']:08d}"
    kept = sorted(p.name for p in ckpts.glob("step-*"))
    task_best = {t["step"] for t in best["tasks"].values()}  # each task's own best is kept too (best:<task>)
    assert kept == sorted({f"step-{s:08d}" for s in {best["step"], 20, *task_best}})
    assert checkpoint.latest(ckpts).name == "step-00000020"
