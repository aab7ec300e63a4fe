"""Validate the consolidation advisor against measured truth: predicted benefit against measured lift.

For each suite (the synthetic canvases at each ``--relatedness``, and MovieLens-100K with ``--raw-dir``):

1. **Advice.** ``unirec.advise`` on the suite's four tasks, with the configuration and the length of the
   unified run of the consolidation measurement (the first grid point: ``--lrs[0]``, ``--sizes[0]``,
   seed 0), before anything else is trained. Its wall time starts once the unified data set is prepared:
   the measurement's unified runs read that same preparation, so neither side pays for it (the bespoke
   data sets, which only the measurement needs, are in the measurement's time).
2. **Measurement.** ``unirec.experiments.consolidation.run_suite`` (the same machinery: equal tuning
   over the grid, ``--seeds`` seeds, test split, the suite's headline NDCG@10): the lift of the unified
   model over the bespoke one, per task, and its seed spread.

Writes ``<out>/validation.md``, ``validation.json`` and ``validation.png`` (the scatter): the Spearman
correlation over all (task, suite) points with their number, the sign agreement on the points whose
measured difference exceeds the seed spread, what the advisor says where a task measurably loses, and the
advisor's wall time against the measurement's. The report is rewritten after every suite, so a partial
sweep still reports what it has (and says it is partial).

Usage::

    python scripts/advisor_validation.py                                  # relatedness 0, .25, .5, .75, 1
    python scripts/advisor_validation.py --raw-dir data/ml-100k           # + MovieLens-100K
    python scripts/advisor_validation.py --render                         # only rewrite from the .json

Finished runs and advice are reused from ``--work`` (default ``runs/advisor-validation``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unirec.experiments.advisor_check import (
    add_reference_costs,
    advise_suite,
    measure_suite,
    points,
    summary,
    write_report,
    write_scatter,
)
from unirec.experiments.consolidation import parser
from unirec.experiments.suites import relatedness, suites

RELATEDNESS = ("0.0", "0.25", "0.5", "0.75", "1.0")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--relatedness", nargs="+", default=list(RELATEDNESS))
    ap.add_argument("--raw-dir", help="MovieLens-100K directory: adds the ml100k suite")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2])
    ap.add_argument("--sizes", nargs="+", default=["S"])
    ap.add_argument("--epochs", type=int, help="epochs per run (default: the consolidation report's)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--work", default="runs/advisor-validation")
    ap.add_argument("--out", default="reports/advisor")
    ap.add_argument("--cache-dir")
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data, 1 epoch (a smoke run)")
    ap.add_argument(
        "--advise-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for the advisor only"
    )
    ap.add_argument(
        "--held-out",
        nargs="+",
        default=[],
        metavar="SUITE",
        help="suites (e.g. synthetic-0.4) the predictor was not designed on: their correlation is also reported alone",
    )
    ap.add_argument(
        "--reference", default="reports", help="committed consolidation reports, for their wall time"
    )
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the .md and .png from the saved .json"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        res = json.loads((out / "validation.json").read_text())
        add_reference_costs(res, Path(args.reference))
        write_report(res, out)
        write_scatter(res, out / "validation.png")
        return
    names = [f"synthetic-{relatedness(r)}" for r in args.relatedness] + (["ml100k"] if args.raw_dir else [])
    cr_args = parser().parse_args(
        ["--suites", *names, "--seeds", str(args.seeds), "--lrs", *map(str, args.lrs), "--sizes", *args.sizes,
         "--batch-size", str(args.batch_size), "--work", str(Path(args.work) / "consolidation")]
        + (["--raw-dir", args.raw_dir] if args.raw_dir else []) + (["--cache-dir", args.cache_dir] if args.cache_dir else [])
        + (["--epochs", str(args.epochs)] if args.epochs else []) + (["--quick"] if args.quick else [])
    )  # fmt: skip
    all_suites = suites(cr_args)
    res = {"planned": names, "suites": [], "points": [], "costs": {}, "seeds": args.seeds,
           "grid": {"lr": args.lrs, "size": args.sizes},
           "command": " ".join(["python", "scripts/advisor_validation.py", *sys.argv[1:]])}  # fmt: skip
    work = Path(args.work)
    for name in names:
        suite = all_suites[name]
        adv = advise_suite(suite, args, work)
        measured = measure_suite(suite, cr_args, work)
        res["suites"].append(name)
        res["points"] += points(name, list(suite.tasks), adv, measured, suite.headline)
        res["costs"][name] = {"advise_seconds": adv["wall_seconds"], "measure_seconds": measured["seconds"],
                              "advise_steps": adv["steps"], "full_run_steps": adv["full_run_steps"]}  # fmt: skip
        res["summary"] = summary(res["points"], res["costs"], args.held_out)
        add_reference_costs(res, Path(args.reference))
        (out / "validation.json").write_text(json.dumps(res, indent=2, sort_keys=True))
        write_report(res, out)
        write_scatter(res, out / "validation.png")
        print(
            f"[{name}] spearman so far {res['summary']['spearman']:+.3f} over {res['summary']['n']} points",
            flush=True,
        )


if __name__ == "__main__":
    main()
