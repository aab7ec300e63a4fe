"""torchrun with two CPU processes (gloo): completes with tasks absent from some ranks' batches, and
matches a single process with the same global batch within a stated tolerance."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, run_train
from unirec.config import compose
from unirec.data.loader import MixedLoader
from unirec.data.prepare import prepare
from unirec.schema import FeatureSpec

COMMON = ["debug=toy", "loader.mix=weights", "task.genre.sampling_weight=0.02", "trainer.max_steps=40",
          "trainer.log_every=1", "trainer.eval_every=40", "trainer.checkpoint_every=40"]  # fmt: skip
# Same data, same global batch (2 x 256 against 1 x 512), different draws: the runs agree to this much.
AUC_TOLERANCE = 0.03
LOSS_TOLERANCE = 0.05


def _torchrun(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "unirec.train", *args]  # fmt: skip
    # Own process group: on a timeout the workers go down with the launcher instead of lingering.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cache = tmp / "cache"
    ddp = _torchrun(
        [*COMMON, f"data.cache_dir={cache}", f"hydra.run.dir={tmp}/ddp", "loader.batch_size=256"], tmp
    )
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    single = run_train(
        [*COMMON, f"data.cache_dir={cache}", f"hydra.run.dir={tmp}/single", "loader.batch_size=512"], tmp
    )
    assert single.returncode == 0, single.stderr[-4000:]
    return cache, tmp / "ddp", tmp / "single"


def test_some_rank_batches_lack_a_task(runs):
    cache = runs[0]
    cfg = compose([*COMMON, f"data.cache_dir={cache}", "loader.batch_size=256", "loader.prefetch=0"])
    features = prepare(cfg.data, cfg.task, cfg.seed)
    spec = FeatureSpec.load(features / "feature_spec.json")
    weights = {t: c.sampling_weight for t, c in cfg.task.items()}
    genre = spec.tasks["genre"].id
    for rank in range(2):
        loader = MixedLoader(features, spec, cfg.loader, weights, cfg.seed, rank, 2)
        absent = sum(not np.any(loader.next_arrays()["task_type"] == genre) for _ in range(40))
        assert 0 < absent < 40, (rank, absent)


def test_ddp_matches_single_process(runs):
    _, ddp_dir, single_dir = runs
    ddp = json.loads((ddp_dir / "metrics.json").read_text())
    single = json.loads((single_dir / "metrics.json").read_text())
    assert ddp["ranks"] == 2 and single["ranks"] == 1
    assert set(ddp["valid"]) == set(single["valid"]) == {"home", "related", "search", "genre", "genre_rows"}
    auc = [(ddp["valid"][t]["auc"], single["valid"][t]["auc"]) for t in ddp["valid"]]
    mean_gap = abs(np.mean([a for a, _ in auc]) - np.mean([b for _, b in auc]))
    assert mean_gap < AUC_TOLERANCE, auc

    def tail_loss(run_dir):
        lines = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == list(range(1, 41))
        return np.mean([r["loss"] for r in lines[-10:]])

    a, b = tail_loss(ddp_dir), tail_loss(single_dir)
    assert abs(a - b) / b < LOSS_TOLERANCE, (a, b)
    # Only rank 0 wrote: one TensorBoard event file, one metrics file.
    assert len(list((ddp_dir / "tb").glob("events.*"))) == 1


@pytest.mark.parametrize("balancing", ["uncertainty", "gradnorm"])
def test_learned_balancer_is_identical_on_every_rank(balancing, tmp_path):
    """Each checkpoint gathers every rank's balancer weights and stops the run if they differ, so a missing
    all-reduce (per-rank s_k gradients, per-rank gradient norms) fails this run."""
    args = ["debug=toy", "loader.mix=weights", "task.genre.sampling_weight=0.02", f"loss.balancing={balancing}",
            "trainer.max_steps=10", "trainer.checkpoint_every=2", "trainer.eval_every=10", "trainer.log_every=1",
            "loader.batch_size=256", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = _torchrun(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 11))
    assert lines[-1]["weights"] != lines[0]["weights"]
