"""The ablation report: every modelling option against the core default, on every task, with its cost.

For each suite (MovieLens-100K, and the default synthetic canvases):

1. **Single variants.** The *baseline* is the core default with its options pinned explicitly
   (:data:`BASELINE`), so it stays the core default when the package defaults change. Every *variant*
   changes exactly one axis of it (:data:`AXES`: tower, loss balancing, task sampling, imputation). Each
   trains with every seed (same learning rate, size, batch and epochs for all; validation every epoch, the
   checkpoint with the best validation mean NDCG@10 is kept) and is evaluated on test with the suite's
   headline protocol (full ranking for MovieLens, the logged impressions for the synthetic canvases).
2. **Combination.** Per axis, the winner is the variant (or the baseline) with the best mean over seeds of
   the *validation* mean-over-tasks NDCG@10 (``metrics.json`` ``best``; test never selects). The
   combination of the axis winners trains with the same seeds unless it is one of the runs already made.
3. **Recommendation.** Of the baseline, the single variants and the combination, the one with the best
   validation mean is recommended as the default (the baseline wins ties); the report sets its test
   NDCG@10 against the baseline's, task by task, and names every task it loses and by how much.

Writes ``<out>/<suite>/ablations.md`` and ``ablations.json``.

Usage::

    python scripts/fetch_movielens.py data/ml-100k
    python scripts/ablations.py --raw-dir data/ml-100k                        # both suites, ~45 min on 2 cores
    python scripts/ablations.py --suites synthetic --variants tower sampling=uniform
    python scripts/ablations.py --render                                       # rewrite the .md from the .json
    python scripts/ablations.py --suites ml100k --raw-dir data/ml-100k --lr 0.005 --size W --patience 2 \
        --set loss.negatives=64 model.tower_layers=1 model.transitions=true   # the MovieLens recipe

Finished runs are reused (``--work``, default ``runs/ablations``; a run whose settings changed trains
again), so an interrupted report resumes; ``--fresh`` starts over. ``--jobs N`` trains N runs at a time,
each process with ``cpu_count // N`` torch threads (each run is locked, so a process started by hand with
the same arguments plus ``--helper`` joins in too; a helper ignores ``--fresh``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Dict, List, Tuple

from unirec.experiments.ablations import (
    AXES,
    LR,
    OUT_DIRS,
    SIZE,
    run_suite,
    select_variants,
    setup_suite,
    suites,
)
from unirec.experiments.ablations_md import chosen_default_section, write_markdown
from unirec.experiments.runs import helpers
from unirec.experiments.suites import SIZES

# -------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", nargs="+", default=["ml100k", "synthetic"], choices=sorted(OUT_DIRS))
    ap.add_argument(
        "--raw-dir", help="MovieLens-100K directory (scripts/fetch_movielens.py); needed for ml100k"
    )
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (0 with --quick)")
    ap.add_argument("--variants", nargs="+", metavar="NAME",
                    help="subset of the variant table: an axis (tower), axis=value (tower=mmoe) or "
                         "key=value (model.tower=mmoe); default: all of " + ", ".join(AXES))  # fmt: skip
    ap.add_argument("--epochs", type=int, help="epochs per run (default: 3 for ml100k, 2 for synthetic)")
    ap.add_argument("--lr", type=float, help=f"learning rate of every run (default {LR})")
    ap.add_argument("--size", choices=sorted(SIZES), help=f"model size of every run (default {SIZE})")
    ap.add_argument(
        "--patience", type=int, help="stop a run after this many validations without a better mean"
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides for every run, e.g. the MovieLens recipe: loss.negatives=64 model.transitions=true")  # fmt: skip
    ap.add_argument("--work", default="runs/ablations", help="run directories (reused when finished)")
    ap.add_argument("--out", default="reports", help="reports go to <out>/<suite>/ablations.{md,json}")
    ap.add_argument("--cache-dir", help="prepared-data cache (default: data.cache_dir / $UNIREC_CACHE)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the saved .json")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training processes sharing the machine's cores, cpu_count // N torch threads each "
                         "(each run is locked; helpers take the free runs and the first process writes the report)")  # fmt: skip
    ap.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)  # a --jobs helper process
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data, 1 epoch, 1 seed (the test)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    try:
        variants = select_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    if "ml100k" in args.suites and not args.raw_dir and not args.render:
        ap.error("suite ml100k needs --raw-dir (python scripts/fetch_movielens.py data/ml-100k)")
    if args.fresh and not (args.render or args.helper) and Path(args.work).exists():  # a helper never
        shutil.rmtree(args.work)
    t0 = time.perf_counter()
    all_suites = suites(args)
    done: List[Tuple[str, Dict]] = []
    # every suite's variants are checked before any training, so a missing option fails at once
    ready = {} if args.render else {n: setup_suite(all_suites[n], variants, args) for n in args.suites}
    with helpers(__file__, args, argv, start=not (args.render or args.helper)):
        for name in args.suites:
            out = Path(args.out) / OUT_DIRS[name]
            if args.render:
                res = json.loads((out / "ablations.json").read_text())
            else:
                res = run_suite(all_suites[name], variants, *ready[name], args)
                if res is None:  # a --jobs helper
                    continue
                out.mkdir(parents=True, exist_ok=True)
                (out / "ablations.json").write_text(json.dumps(res, indent=2))
            kept = chosen_default_section(out / "ablations.md")
            write_markdown(res, out / "ablations.md")
            if kept:  # the maintainers' decision is prose, not data: a regenerated report keeps it
                with (out / "ablations.md").open("a") as f:
                    f.write("\n" + kept)
            print(f"wrote {out / 'ablations.md'}", flush=True)
            done.append((name, res["recommended"]))
    for name, rec in done:
        print(f"{name}: recommended default {rec['name']}"
              + (f": {rec['overrides']}" if rec["overrides"] else " (no override: keep the core default)")
              + (f"; below the baseline on test for {', '.join(rec['losing'])}" if rec["losing"] else ""))  # fmt: skip
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
