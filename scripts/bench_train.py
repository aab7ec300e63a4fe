"""Is the data path the bottleneck? End-to-end training throughput against compute alone, in one run.

    python scripts/bench_train.py                       # default model, batch 4096, synthetic default data
    python scripts/bench_train.py --steps 40 --repeats 5 loader.batch_size=8192

Prints, as medians over repeats (each repeat runs both modes back to back, so drift hits both):
  end-to-end samples/s   the real loop: MixedLoader (prefetch thread) -> device -> train_step
  compute-only samples/s the same model and train_step over batches already materialised in memory
  ratio                  end-to-end / compute-only (target >= 0.9)
  page faults, CPU ms    per compute-only step (the process's minor faults and CPU time; compare
                         trainer.keep_freed_memory=false in a second invocation)
  loader samples/s       MixedLoader alone, against a naive per-row torch Dataset + default collate
                         over the same parquet shards (target >= 10x)
Trailing arguments are Hydra overrides of the training config.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from itertools import islice

import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset

from unirec.config import compose
from unirec.data.batch import table_to_arrays, to_batch
from unirec.data.loader import shard_files
from unirec.data.prepare import prepare
from unirec.train import setup, train_step


class RowDataset(Dataset):
    """The naive baseline: one row per ``__getitem__``, batched by torch's default collate."""

    def __init__(self, files):
        self.columns = table_to_arrays(pq.read_table(files))
        self.n = len(self.columns["label"])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {name: values[i] for name, values in self.columns.items()}


def _steps(tr, batches, steps: int) -> float:
    """Samples/s of ``steps`` train steps pulling from ``batches``."""
    start = time.perf_counter()
    n = 0
    for batch in islice(batches, steps):
        batch = batch.to(tr.device, non_blocking=True)
        train_step(tr, batch)
        n += len(batch)
    if tr.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="train steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loader-batches", type=int, default=50)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. loader.batch_size=8192")
    args = ap.parse_args()
    cfg = compose(["trainer.max_steps=100000", *args.overrides])
    features = prepare(cfg.data, cfg.task, cfg.seed)
    tr = setup(cfg, features)
    bs = cfg.loader.batch_size
    print(f"device={tr.device} threads={torch.get_num_threads()} batch={bs} "
          f"params={sum(p.numel() for p in tr.model.parameters()):,}")  # fmt: skip

    in_memory = [to_batch(tr.loader.next_arrays(), tr.spec).to(tr.device) for _ in range(args.steps)]
    _steps(tr, iter(in_memory), 5)  # warm-up (allocator, kernels)
    e2e, compute = [], []
    for r in range(args.repeats):
        e2e.append(_steps(tr, iter(tr.loader), args.steps))
        compute.append(_steps(tr, iter(in_memory), args.steps))
        print(f"repeat {r}: end-to-end {e2e[-1]:,.0f}/s  compute-only {compute[-1]:,.0f}/s  "
              f"ratio {e2e[-1] / compute[-1]:.3f}")  # fmt: skip
    ratios = [a / b for a, b in zip(e2e, compute)]
    print(f"end-to-end samples/s   {statistics.median(e2e):>12,.0f}")
    print(f"compute-only samples/s {statistics.median(compute):>12,.0f}")
    print(f"ratio (median)         {statistics.median(ratios):>12.3f}")
    # The allocator's share (trainer.keep_freed_memory): minor page faults and CPU time per compute-only step.
    faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
    _steps(tr, iter(in_memory), args.steps)
    faults, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, time.process_time() - cpu
    print(f"page faults per step   {faults / args.steps:>12,.0f}")
    print(f"CPU ms per step        {cpu / args.steps * 1e3:>12,.1f}")

    files = [f for t in tr.spec.tasks for f in shard_files(features, "train", t)]
    ours, naive = [], []
    rows = RowDataset(files)
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            tr.loader.next_batch()
        ours.append(args.loader_batches * bs / (time.perf_counter() - start))
        dl = DataLoader(rows, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        n = sum(len(b["label"]) for b in islice(dl, max(2, args.loader_batches // 4)))
        naive.append(n / (time.perf_counter() - start))
    print(f"loader samples/s       {statistics.median(ours):>12,.0f}")
    print(f"naive Dataset samples/s{statistics.median(naive):>12,.0f}")
    print(f"loader speed-up        {statistics.median(ours) / statistics.median(naive):>12.1f}x")


if __name__ == "__main__":
    main()
