"""What one training step and one validation of the MovieLens recipe cost on this checkout (one thread).

    python scripts/bench_recipe.py --raw-dir data/ml-100k --run RUN_DIR
    python scripts/bench_recipe.py --raw-dir data/ml-100k --run RUN_DIR --repeats 5 trainer.valid_protocol=full

``RUN_DIR``: a finished unified run of the recipe (e.g. one of ``scripts/consolidation_report.py``'s); its
best checkpoint is what the validation scores. Trailing arguments are Hydra overrides on top of
``experiment=ml100k`` (the report's recipe; how often a run validates changes neither figure).

Prints medians over ``--repeats``: seconds per train step (``--steps`` steps over batches already in
memory, after a warm-up) and seconds per validation (``unirec.validation.Validation.model``, the prior's
weight fit included), and the validation's ndcg@10 per task, so that two checkouts can be compared on the
same figures. To compare two commits, run it in each checkout in turn, nothing else running.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from unirec.config import compose
from unirec.data.batch import to_batch
from unirec.data.prepare import prepare
from unirec.evaluate import load
from unirec.train import setup, train_step
from unirec.validation import Validation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw-dir", required=True, help="the MovieLens-100K directory")
    ap.add_argument("--run", type=Path, required=True, help="a finished unified run of the recipe")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = compose(["experiment=ml100k", f"data.raw_dir={args.raw_dir}", *args.overrides])
    tr = setup(cfg, prepare(cfg.data, cfg.task, cfg.seed))
    batches = [to_batch(tr.loader.next_arrays(), tr.spec) for _ in range(args.steps + 5)]
    for b in batches[:5]:
        train_step(tr, b)
    steps = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for b in batches[5:]:
            train_step(tr, b)
        steps.append((time.perf_counter() - t0) / args.steps)
    loaded = load(args.run)
    spec = loaded.featurizer.spec
    validation = Validation(loaded.features, spec, cfg.trainer.valid_protocol, cfg.trainer.eval_batch_size)
    validation.model(loaded.model, torch.device("cpu"))  # reads the valid requests once, as a run does
    seconds = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scores = validation.model(loaded.model, torch.device("cpu"))
        seconds.append(time.perf_counter() - t0)
    print(f"train step, s (median of {args.repeats})   {statistics.median(steps):.4f}   "
          f"all: {' '.join(f'{s:.4f}' for s in steps)}")  # fmt: skip
    print(f"validation, s (median of {args.repeats})   {statistics.median(seconds):.2f}   "
          f"all: {' '.join(f'{s:.2f}' for s in seconds)}")  # fmt: skip
    print("valid ndcg@10: " + " ".join(f"{t} {s['ndcg@10']:.4f}" for t, s in sorted(scores.items())))


if __name__ == "__main__":
    main()
