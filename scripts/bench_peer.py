"""Training speed beside a peer library: torch-rechub's MMOE and unirec's ``model.tower=mmoe`` on the same rows.

    python -m venv --system-site-packages .venv-peer                 # the peer in its own environment,
    .venv-peer/bin/pip install --no-deps torch-rechub                # on this machine's torch (no torch pull)
    .venv-peer/bin/pip install pandas scikit-learn                   # its other imports
    python scripts/bench_peer.py --peer-python .venv-peer/bin/python

The rows: ``--rows`` (1M) seeded rows of 8 categorical fields (3,100 values in all) and 1 dense field, with
4 binary labels drawn from a known logistic model. torch-rechub trains on them through its own path, as in
its examples: ``DataGenerator`` -> torch ``DataLoader`` (a per-row ``Dataset``) -> ``MTLTrainer`` with
``MMOE`` (embedding 16, 4 experts of [256, 128], towers of [64], batch 4096, Adam), one timed epoch.
unirec trains on the same rows written as its feature shards (6 categorical fields and the dense one as the
request context, 2 categorical fields as the candidate; row i is an example of task ``i % 4`` with that
task's label, since a unirec row trains its own task's head) through its own path: ``MixedLoader`` ->
``train_step``, the closest configuration (``model.tower=mmoe``, embedding 16, an interaction 3 x 43 = 129
wide as the peer's expert input, 4 experts of [256, 128], heads of [64], batch 4096), for the same number
of steps, then the same steps on batches already in memory (compute only). Samples are rows for both.

Each repeat runs both libraries, interleaved, each in a fresh process; the figures are medians of the
repeats. Before each timed run the script waits until the machine is quiet: the whole machine's CPU
busy fraction, sampled from /proc/stat over one second, below ``--quiet`` (10 %), for up to
``--max-wait`` seconds; the busy fraction it saw is printed beside each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CARDINALITIES = (1000, 800, 500, 300, 200, 150, 100, 50)
CONTEXT = ("f0", "f1", "f2", "f3", "f4", "f5")
CANDIDATE = ("f6", "f7")
TASKS = 4
BATCH = 4096


def make_rows(n: int, seed: int) -> dict:
    """Seeded rows: categorical ids 1..cardinality (0 is the sentinel in both libraries), one standardised
    dense value, and 4 labels, each Bernoulli of a per-task logistic of per-value weights and the dense one."""
    rng = np.random.default_rng(seed)
    rows = {f"f{i}": rng.integers(1, c + 1, n).astype(np.int64) for i, c in enumerate(CARDINALITIES)}
    rows["d0"] = rng.standard_normal(n).astype(np.float32)
    logits = np.zeros((n, TASKS))
    for i, c in enumerate(CARDINALITIES):
        w = rng.normal(0, 0.6, (c + 1, TASKS)) + rng.normal(0, 0.4, (c + 1, 1))  # tasks share part of it
        logits += w[rows[f"f{i}"]]
    logits += rows["d0"][:, None] * rng.normal(0, 0.5, TASKS) - 1.0
    rows["y"] = (rng.random((n, TASKS)) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    return rows


def write_unirec_features(rows: dict, out: Path) -> Path:
    """The rows as unirec feature shards + feature_spec.json (what ``unirec.data.prepare`` writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unirec.schema import CandidateSpec, FeatureSpec, FieldSpec, TableSpec, TaskSpec

    cards = dict(zip((f"f{i}" for i in range(8)), CARDINALITIES))
    context = {f: FieldSpec(f, "categorical", table=f) for f in CONTEXT}
    context["d0"] = FieldSpec("d0", "dense")
    fields = (*CONTEXT, "d0")
    spec = FeatureSpec(
        context=context,
        candidates={"item": CandidateSpec("item", "items.parquet", "f6", "f6", CANDIDATE)},
        candidate_fields={f: FieldSpec(f, "categorical", table=f, column=f) for f in CANDIDATE},
        tasks={f"t{k}": TaskSpec(f"t{k}", k, "item", fields, metrics=("auc",)) for k in range(TASKS)},
        tables={f: TableSpec(f, c + 1) for f, c in cards.items()},
    )
    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "feature_spec.json")
    n = len(rows["y"])
    task = np.arange(n) % TASKS
    for k in range(TASKS):
        mine = task == k
        cols = {
            "task_type": pa.array(np.full(mine.sum(), k, np.int32)),
            "request_id": pa.array(np.flatnonzero(mine).astype(np.int64)),
            "label": pa.array(rows["y"][mine, k]),
            "weight": pa.array(np.ones(mine.sum(), np.float32)),
        }
        for f in fields:
            values = rows[f][mine]
            cols[f"ctx.{f}"] = pa.array(values if f == "d0" else values.astype(np.int32))
            cols[f"has.{f}"] = pa.array(np.ones(mine.sum(), np.uint8))
        for f in CANDIDATE:
            cols[f"cand.{f}"] = pa.array(rows[f][mine].astype(np.int32))
        shard = out / "train" / f"t{k}" / "part-00000.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), shard, row_group_size=65_536)
    return out


def run_rechub(rows_file: Path) -> dict:
    """One timed epoch of torch-rechub's MMOE through DataGenerator / DataLoader / MTLTrainer."""
    import torch
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    torch.manual_seed(0)
    rows = dict(np.load(rows_file))
    features = [SparseFeature(f"f{i}", c + 1, embed_dim=16) for i, c in enumerate(CARDINALITIES)]
    features.append(DenseFeature("d0"))
    x = {f.name: rows[f.name] for f in features}
    small = {k: v[:BATCH] for k, v in x.items()}
    train, _, _ = DataGenerator(x, rows["y"]).generate_dataloader(
        small, rows["y"][:BATCH], small, rows["y"][:BATCH], batch_size=BATCH
    )
    model = MMOE(features, ["classification"] * TASKS, n_expert=4,
                 expert_params={"dims": [256, 128]}, tower_params_list=[{"dims": [64]}] * TASKS)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MTLTrainer(model, ["classification"] * TASKS, optimizer_params={"lr": 1e-3, "weight_decay": 1e-5},
                             n_epoch=1, device="cpu", model_path=tmp)  # fmt: skip
        start = time.perf_counter()
        trainer.train_one_epoch(train)
        elapsed = time.perf_counter() - start
    return {
        "samples_per_s": len(rows["y"]) / elapsed,
        "steps": len(train),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# The closest shape: the interaction [c, v, c * v] is 3H = 129 wide, the width of the peer's 8 x 16
# embeddings plus the dense field; 4 experts of [256, 128]; one head of [64] per task.
UNIREC_OVERRIDES = ["model.tower=mmoe", "model.embedding_dim=16", "model.experts=4", "model.hidden_dim=43",
                    "model.expert_dims=[256,128]", "model.head_hidden=64", "model.dropout=0.0",
                    f"loader.batch_size={BATCH}", "trainer.max_steps=100000"]  # fmt: skip


def run_unirec(features: Path, steps: int) -> dict:
    """``steps`` steps end to end (MixedLoader with its prefetch thread -> train_step), then the same
    number on batches already in memory; unirec's own loop pieces, as ``scripts/bench_train.py`` times them."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train import _steps

    from unirec.config import TaskConfig, compose
    from unirec.data.batch import to_batch
    from unirec.train import setup

    cfg = compose(UNIREC_OVERRIDES)
    cfg.task = {f"t{k}": TaskConfig(id=k) for k in range(TASKS)}  # the shards' tasks, pointwise BCE each
    tr = setup(cfg, features)
    in_memory = [to_batch(tr.loader.next_arrays(), tr.spec) for _ in range(min(steps, 60))]
    _steps(tr, iter(in_memory), 3)  # warm-up (allocator, kernels)
    e2e = _steps(tr, iter(tr.loader), steps)
    compute = _steps(tr, (in_memory[i % len(in_memory)] for i in range(steps)), steps)
    return {
        "samples_per_s": e2e,
        "compute_only_per_s": compute,
        "steps": steps,
        "parameters": sum(p.numel() for p in tr.module.parameters()),
    }


def busy_fraction(seconds: float = 1.0) -> float:
    """The whole machine's CPU busy fraction over ``seconds`` (from /proc/stat)."""

    def sample():
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait until the machine is quiet (busy below ``threshold``) or ``max_wait`` passes; the last busy seen."""
    deadline = time.monotonic() + max_wait
    busy = busy_fraction()
    while busy >= threshold and time.monotonic() < deadline:
        busy = busy_fraction()
    return busy


def side(argv: list, python: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([python, __file__, *argv], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer-python", default=sys.executable, help="a Python that can import torch_rechub")
    ap.add_argument("--work", type=Path, help="where the rows and shards go (default: a temporary directory)")
    ap.add_argument(
        "--quiet", type=float, default=0.10, help="busy fraction below which the machine is quiet"
    )
    ap.add_argument("--max-wait", type=float, default=600.0)
    ap.add_argument("--side", choices=("rechub", "unirec"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "rechub":
        print(json.dumps(run_rechub(args.data)))
        return
    steps = args.rows // BATCH
    if args.side == "unirec":
        print(json.dumps(run_unirec(args.data, steps)))
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.rows, seed=0)
    np.savez(work / "rows.npz", **rows)
    write_unirec_features(rows, work / "features")
    print(f"busy before: {busy_fraction():.0%}  cpus: {os.cpu_count()}")
    print(f"{args.rows:,} rows, 8 categorical + 1 dense fields, {TASKS} tasks, batch {BATCH}, {steps} steps a run; "
          f"positive rate per task {[round(float(m), 3) for m in rows['y'].mean(0)]}")  # fmt: skip
    peer, ours = [], []
    for r in range(args.repeats):
        busy = wait_quiet(args.quiet, args.max_wait)
        peer.append(side(["--side", "rechub", "--data", str(work / "rows.npz")], args.peer_python))
        print(
            f"repeat {r}: torch-rechub MMOE {peer[-1]['samples_per_s']:9,.0f} samples/s   (busy before {busy:.0%})"
        )
        busy = wait_quiet(args.quiet, args.max_wait)
        ours.append(
            side(
                ["--side", "unirec", "--data", str(work / "features"), "--rows", str(args.rows)],
                sys.executable,
            )
        )
        print(f"repeat {r}: unirec mmoe       {ours[-1]['samples_per_s']:9,.0f} samples/s   compute-only "
              f"{ours[-1]['compute_only_per_s']:,.0f}/s   (busy before {busy:.0%})")  # fmt: skip
    p = statistics.median(x["samples_per_s"] for x in peer)
    u = statistics.median(x["samples_per_s"] for x in ours)
    ratio = statistics.median(x["samples_per_s"] / x["compute_only_per_s"] for x in ours)
    print(f"parameters: torch-rechub {peer[0]['parameters']:,}   unirec {ours[0]['parameters']:,}")
    print(f"end-to-end samples/s (median of {args.repeats}): torch-rechub {p:,.0f}   unirec {u:,.0f}   "
          f"unirec / torch-rechub {u / p:.2f}x")  # fmt: skip
    print(f"unirec end-to-end / compute-only (median of per-repeat ratios): {ratio:.3f}")


if __name__ == "__main__":
    main()
