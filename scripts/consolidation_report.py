"""The consolidation report: one unified model against four bespoke models, task by task, and their footprint.

For each suite (MovieLens-100K, and the synthetic canvases at relatedness 1.0 and 0.0 by default; any
relatedness r in [0, 1] is the suite ``synthetic-<r>``):

1. **Equal tuning.** Every grid point (learning rate x model size) trains the unified model (all tasks) and
   one bespoke model per task (``task=[<that task>]``: the same code, one task's data, its own vocabulary)
   with seed 0. Each run trains the same number of epochs over its own data and keeps the checkpoint with
   the best validation NDCG@10 (``trainer.valid_protocol``, every ``trainer.eval_every_epochs``), so
   training length is tuned alike.
   The unified model picks the grid point with the best mean validation score over tasks; each bespoke
   model picks its own best grid point for its task. The validation score is the suite's headline
   protocol: full ranking for MovieLens, the logged impressions for the synthetic canvases.
   With ``--tuned DIR`` the grid gives way to a search per model kind: each takes the best point of its own
   Optuna search (``DIR/<kind>/optimization_results.yaml``, the same number of trials for every kind).
2. **Seeds.** The chosen configurations train again with the other seeds: the seed draws the weights and
   the batch order, and for MovieLens also the canvas assignment, contexts and negatives of the derivation
   (the synthetic data stay those of ``data.synthetic.seed``). Unified and bespoke runs of one seed always
   share their data.
3. **Test.** Every chosen run is evaluated on the test split, both protocols for MovieLens (full ranking,
   and the positive plus 100 sampled negatives), the logged impressions for the synthetic canvases, with
   the popularity baseline of the same data. Each unified run is also read as environments that each
   serve their own task's best step (``best:<task>``): the tasks whose best validation step is not the
   best-mean one are evaluated there too.
4. **Footprint.** Parameters, training wall time, artifact bytes (``python -m unirec.export`` of the
   chosen checkpoint) and serving memory (peak RSS of a process that loads and warms the artifact, as
   ``unirec.serve`` does): one unified model against the sum of the bespoke ones.

Writes ``<out>/<suite>/consolidation.md``, ``consolidation.json`` and ``consolidation.png``.

Usage::

    python scripts/fetch_movielens.py data/ml-100k
    python scripts/consolidation_report.py --raw-dir data/ml-100k          # every suite, ~30 min on 2 cores
    python scripts/consolidation_report.py --suites ml100k --raw-dir data/ml-100k
    python scripts/consolidation_report.py --suites synthetic-0.5     # -> reports/synthetic/relatedness-0.5
    python scripts/consolidation_report.py --suites ml100k --raw-dir data/ml-100k --tuned runs/optuna
        # after: python -m unirec.train -m hparams_search=ml100k_cpu experiment=ml100k data.raw_dir=data/ml-100k
        #   hydra.sweep.dir=runs/optuna/unified (and task=[movielens/<t>] hydra.sweep.dir=runs/optuna/bespoke-<t>)

Finished runs are reused (``--work``, default ``runs/consolidation``), so an interrupted report resumes;
``--fresh`` starts over.
"""

import json
import shutil
import time
from pathlib import Path

from unirec.experiments.consolidation import parser, run_suite
from unirec.experiments.consolidation_md import write_chart, write_markdown
from unirec.experiments.runs import helpers
from unirec.experiments.suites import SYNTHETIC, relatedness, suite_dir, suites


def main(argv=None) -> None:
    ap = parser(__doc__.split("\n\n")[0])
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (the report gives mean ± std)")
    if args.fresh and not args.helper and Path(args.work).exists():  # a helper never: the runs started
        shutil.rmtree(args.work)
    try:  # "synthetic-1" names the suite synthetic-1.0
        args.suites = [SYNTHETIC + relatedness(n[len(SYNTHETIC) :]) if n.startswith(SYNTHETIC) else n
                       for n in args.suites]  # fmt: skip
    except ValueError as e:
        ap.error(str(e))
    all_suites = suites(args)
    unknown = [s for s in args.suites if s not in all_suites]
    if unknown:
        ap.error(f"unknown suite(s) {unknown}; known: {sorted(all_suites)}")
    if "ml100k" in args.suites and not args.raw_dir and not args.render:
        ap.error("suite ml100k needs --raw-dir (python scripts/fetch_movielens.py data/ml-100k)")
    t0 = time.perf_counter()
    with helpers(__file__, args, argv, start=not (args.render or args.helper)):
        for name in args.suites:
            suite = all_suites[name]
            out = Path(args.out) / suite_dir(name)
            if args.render:
                res = json.loads((out / "consolidation.json").read_text())
            else:
                res = run_suite(suite, args)
                if res is None:  # --only-seeds, or a --jobs helper
                    continue
                out.mkdir(parents=True, exist_ok=True)
                (out / "consolidation.json").write_text(json.dumps(res, indent=2, sort_keys=True))
            write_markdown(res, suite, out / "consolidation.md")
            write_chart(res, suite, out / "consolidation.png")
            print(f"wrote {out / 'consolidation.md'}", flush=True)
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
