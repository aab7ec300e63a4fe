"""The consolidation measurement of one suite: equal tuning over a grid, seeds, test evaluation and the
footprint (see ``scripts/consolidation_report.py`` for the protocol), summarised as plain data."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from unirec.experiments.runs import (
    at_own_step,
    bare_rss_mb,
    evaluate,
    footprint,
    headline,
    per_task,
    run_lock,
    train,
)
from unirec.experiments.suites import SIZES, TUNED, Suite

BASELINES = ("popularity_all", "bpr_mf", "transitions")
"""Baselines of the full protocol beside the task's own popularity (:mod:`unirec.baselines`)."""


def kinds(tasks) -> List[tuple]:
    """The model kinds of a suite, in report order: (``unified``, every task), then (``bespoke-<task>``,
    [task]) per task."""
    return [("unified", list(tasks))] + [(f"bespoke-{t}", [t]) for t in tasks]


def tuned_points(root: Path, names: Sequence[str]) -> Dict[str, Dict]:
    """Per model kind, the best point of its hyperparameter search: ``<root>/<kind>/optimization_results.yaml``
    as Hydra's Optuna sweeper writes it (``python -m unirec.train -m hparams_search=...
    hydra.sweep.dir=<root>/<kind>``), with every finished trial's best validation value in trial order and
    the trials' training length. Every kind must have finished the same number of trials: an unequal budget
    is no equal tuning."""
    import yaml
    from omegaconf import OmegaConf

    out = {}
    for kind in names:
        best = root / kind / "optimization_results.yaml"
        if not best.exists():
            raise FileNotFoundError(f"{best}: no finished search for {kind} (hydra.sweep.dir={root / kind})")
        found = yaml.safe_load(best.read_text())
        trials = sorted((int(d.name), d) for d in (root / kind).iterdir() if d.name.isdigit())
        done = [d for _, d in trials if (d / "metrics.json").exists()]
        if not done:
            raise FileNotFoundError(f"{root / kind}: the search finished no trial (no <n>/metrics.json)")
        trainer = OmegaConf.load(done[0] / "config.yaml").trainer
        params = found["best_params"]
        out[kind] = {
            "params": params,
            "overrides": [f"{k}={v}" for k, v in params.items()],
            "best_valid": float(found["best_value"]),
            "trials": [json.loads((d / "metrics.json").read_text())["best"]["value"] for d in done],
            "trainer": {k: int(trainer[k]) for k in ("epochs", "patience", "eval_every_epochs")},
        }
    budgets = {kind: len(p["trials"]) for kind, p in out.items()}
    if len(set(budgets.values())) > 1:
        raise ValueError(f"unequal tuning budgets under {root}: finished trials per model kind {budgets}")
    return out


class SuiteRuns:
    """The runs of one suite: where each lives, one trained (or reused) and evaluated under its lock, and
    the order in which processes sharing the work (``--jobs``) take them. A run is a tuple
    ``(kind, tasks, lr, size, seed)``; kind is ``unified`` or ``bespoke-<task>``; size ``TUNED`` takes the
    kind's point of its search (``args.tuned``, :func:`tuned_points`)."""

    def __init__(self, suite: Suite, args):
        self.suite, self.args = suite, args
        self.work = Path(args.work) / suite.name
        self.tasks = list(suite.tasks)
        self.started = time.perf_counter()
        tuned = getattr(args, "tuned", None)
        self.tuned = tuned_points(Path(tuned), [k for k, _ in self.kinds()]) if tuned else {}

    def log(self, msg: str) -> None:
        print(f"[{self.suite.name} {self.seconds():6.0f}s] {msg}", flush=True)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def kinds(self) -> List[tuple]:
        return kinds(self.tasks)

    def dir(self, kind: str, lr: float, size: str, seed: int) -> Path:
        return self.work / f"{kind}-lr{lr:g}-{size}-s{seed}"

    def run_and_evaluate(self, run, split: str, wait: bool = True):
        """Train (or reuse) one run and evaluate it on ``split`` under its lock -> (run dir, metrics,
        evaluation); None where another process holds it and ``wait`` is False."""
        kind, ts, lr, size, seed = run
        suite, d = self.suite, self.dir(kind, lr, size, seed)
        with run_lock(d, wait) as mine:  # another process of the report may be on this run: it is reused
            if not mine:
                return None
            extra = self.tuned[kind]["overrides"] if size == TUNED else ()
            m = train(suite, ts, lr, size, seed, d, self.args, extra)
            if split == "valid":
                return d, m, evaluate(d, "valid", (suite.headline,))
            # The baselines depend on the data only, which the seed's unified run holds in full.
            res = evaluate(d, "test", suite.protocols, kind == "unified", self.work / "baselines")
            if kind == "unified":
                res = {**res, "per_task": per_task(d, ts, suite.protocols)}
            return d, m, res

    def take_free(self, runs, split: str) -> None:
        """Train and evaluate every run no other process holds, longest first (unified before bespoke;
        seed order within each), so processes sharing the work end within about one short bespoke run of
        each other instead of one waiting out another's unified run."""
        for run in sorted(runs, key=lambda r: -len(r[1])):
            self.run_and_evaluate(run, split, wait=False)

    def sweep(self, runs, grid) -> Tuple[Dict[str, Dict[str, float]], Dict[str, tuple]]:
        """(kind -> grid point -> valid headline ndcg@10 of seed 0, kind -> the grid point chosen)."""
        sweep: Dict[str, Dict[str, float]] = {}
        for run in runs:
            kind, ts, lr, size, _ = run
            _, _, valid = self.run_and_evaluate(run, "valid")
            point = f"lr={lr:g} size={size}"
            sweep.setdefault(kind, {})[point] = float(np.mean([headline(valid, self.suite, t) for t in ts]))
            self.log(f"sweep {kind} {point}: valid ndcg@10 {sweep[kind][point]:.4f}")
        if self.tuned:  # each kind's search chose its point already
            lrs = {
                kind: float(p["params"].get("optim.lr", self.args.lrs[0])) for kind, p in self.tuned.items()
            }
            return sweep, {kind: (lr, TUNED) for kind, lr in lrs.items()}
        score = lambda kind, g: sweep.get(kind, {}).get(f"lr={g[0]:g} size={g[1]}", 0.0)  # noqa: E731
        return sweep, {kind: max(grid, key=lambda g: score(kind, g)) for kind, _ in self.kinds()}

    def seeds(self, runs) -> Tuple[Dict[str, List[Dict]], Dict[str, List[Dict]]]:
        """(kind -> test evaluation per seed, kind -> run facts per seed), in seed order."""
        test: Dict[str, List[Dict]] = {}
        meta: Dict[str, List[Dict]] = {}
        for run in runs:
            kind, ts, seed = run[0], run[1], run[4]
            d, m, res = self.run_and_evaluate(run, "test")
            test.setdefault(kind, []).append(res)
            meta.setdefault(kind, []).append(
                {"run": str(d), **{k: m.get(k) for k in ("parameters", "wall_seconds", "steps", "best")}}
            )
            self.log(f"seed {seed} {kind}: test {self.suite.headline} ndcg@10 "
                     + " ".join(f"{t}={headline(res, self.suite, t):.4f}" for t in ts))  # fmt: skip
        return test, meta


def run_suite(suite: Suite, args) -> Dict:
    """1. sweep the grid with seed 0, chosen on valid; 2. every seed at the chosen point; 3. test; 4. the
    footprint of seed 0's runs -> :func:`summarise`. A helper process (``args.helper``) only takes the runs
    free at the time and returns None; so does one given ``args.only_seeds``, after its seeds."""
    runs = SuiteRuns(suite, args)
    grid = [] if runs.tuned else [(lr, size) for lr in args.lrs for size in args.sizes]
    helper = getattr(args, "helper", False)
    # A process that only takes some seeds needs no sweep where the grid has one point: nothing to choose.
    only = getattr(args, "only_seeds", None)
    sweeping = [] if (only or helper) and len(grid) == 1 else grid
    sweep_runs = [(kind, ts, lr, size, 0) for lr, size in sweeping for kind, ts in runs.kinds()]
    # Every process first takes the sweep runs no other holds (the helpers, and this one, which then waits
    # for the rest): waiting on the first run a helper holds would leave a core idle for the whole sweep.
    runs.take_free(sweep_runs, "valid")
    sweep, chosen = runs.sweep(sweep_runs, grid)
    seed_runs = [
        (kind, ts, *chosen[kind], seed) for seed in only or range(args.seeds) for kind, ts in runs.kinds()
    ]
    runs.take_free(seed_runs, "test")
    if helper:
        runs.log("helper done: the runs it took are trained and evaluated")
        return None
    test, meta = runs.seeds(seed_runs)
    if only:
        runs.log(f"seeds {only} done; the report is written by the process that runs them all")
        return None
    registry = runs.work / "registry"
    foot = {kind: footprint(Path(meta[kind][0]["run"]), registry / kind) for kind, _ in runs.kinds()}
    floor = bare_rss_mb()
    runs.log("footprint measured")
    return summarise(suite, args, sweep, chosen, test, meta, foot, floor, runs.seconds(), runs.tuned)


METRICS = {"full": ("ndcg@10", "recall@10", "mrr"), "sampled": ("ndcg@10", "recall@10", "auc")}
"""Per protocol, the test metrics the report tabulates, in the order its tables list them."""


def summarise(suite, args, sweep, chosen, test, meta, foot, floor, seconds, tuned=None) -> Dict:
    tasks = list(suite.tasks)
    own_steps = all("per_task" in r for r in test["unified"])  # runs read at each task's own best step
    table = {}
    for protocol in suite.protocols:
        for t in tasks:
            for metric in METRICS[protocol]:
                if metric not in test["unified"][0]["protocols"][protocol]["model"][t]:
                    continue
                u = [r["protocols"][protocol]["model"][t][metric] for r in test["unified"]]
                b = [r["protocols"][protocol]["model"][t][metric] for r in test[f"bespoke-{t}"]]
                p = [r["protocols"][protocol]["popularity"][t][metric] for r in test["unified"]]
                table[(protocol, t, metric)] = {"unified": u, "bespoke": b, "popularity": p}
                if own_steps:
                    own = [at_own_step(r, protocol, t)[metric] for r in test["unified"]]
                    table[(protocol, t, metric)]["unified_own_step"] = own
                for base in BASELINES:  # trained on the unified run's data, so one per seed
                    runs = [r["protocols"][protocol].get(base, {}).get(t) for r in test["unified"]]
                    if all(runs):
                        table[(protocol, t, metric)][base] = [x[metric] for x in runs]
    bespoke_kinds = [k for k, _ in kinds(tasks)[1:]]
    fp = {
        "parameters": (
            meta["unified"][0]["parameters"],
            sum(meta[k][0]["parameters"] for k in bespoke_kinds),
        ),
        "train_seconds": (
            float(np.mean([m["wall_seconds"] for m in meta["unified"]])),
            sum(float(np.mean([m["wall_seconds"] for m in meta[k]])) for k in bespoke_kinds),
        ),
        "artifact_bytes": (
            foot["unified"]["artifact_bytes"],
            sum(foot[k]["artifact_bytes"] for k in bespoke_kinds),
        ),
        "serving_rss_mb": (
            foot["unified"]["serving_rss_mb"],
            sum(foot[k]["serving_rss_mb"] for k in bespoke_kinds),
        ),
        "serving_rss_over_floor_mb": (
            foot["unified"]["serving_rss_mb"] - floor,
            sum(foot[k]["serving_rss_mb"] - floor for k in bespoke_kinds),
        ),
    }
    if own_steps:  # one export per environment, at its task's best step
        steps = len(set(test["unified"][0]["per_task"]["steps"].values()))
        fp["artifact_bytes_own_steps"] = (
            steps * foot["unified"]["artifact_bytes"],
            sum(foot[k]["artifact_bytes"] for k in bespoke_kinds),
        )
    steps_read = (
        [{k: r["per_task"][k] for k in ("best", "steps")} for r in test["unified"]] if own_steps else []
    )
    out = {
        "suite": suite.name,
        "title": suite.title,
        "seeds": args.seeds,
        "epochs": suite.epochs,
        "patience": getattr(args, "patience", None),
        "validation": validation_of(Path(meta["unified"][0]["run"])),
        "grid": {} if tuned else {"lr": args.lrs, "size": {s: SIZES[s] for s in args.sizes}},
        "sweep_valid_ndcg@10": sweep,
        "chosen": {k: {"lr": v[0], "size": v[1]} for k, v in chosen.items()},
        "tuning": {"root": str(args.tuned), "kinds": tuned} if tuned else None,
        "test": {"|".join(k): v for k, v in table.items()},
        "footprint": fp,
        "own_steps": steps_read,
        "serving_floor_rss_mb": floor,
        "runs": meta,
        "seconds": round(seconds, 1),
        "command": " ".join(["python", "scripts/consolidation_report.py", *sys.argv[1:]]),
    }
    return out


def validation_of(run: Path) -> Dict:
    """How a run validated (from its ``config.yaml``): every how many epochs, under which protocol."""
    from omegaconf import OmegaConf

    trainer = OmegaConf.load(run / "config.yaml").trainer
    return {"every_epochs": int(trainer.eval_every_epochs), "protocol": str(trainer.valid_protocol)}


def parser(description: str = "The consolidation report.") -> argparse.ArgumentParser:
    """The command line of ``scripts/consolidation_report.py`` (``scripts/advisor_validation.py`` builds its
    measurement settings from it)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--suites", nargs="+", default=["ml100k", "synthetic-1.0", "synthetic-0.0"])
    ap.add_argument(
        "--raw-dir", help="MovieLens-100K directory (scripts/fetch_movielens.py); needed for ml100k"
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 3e-2])
    ap.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        help="of every run (the core default 4096 gives a bespoke MovieLens model only ~25 steps per epoch)",
    )
    ap.add_argument("--sizes", nargs="+", default=["S", "M"], choices=sorted(SIZES))
    ap.add_argument(
        "--tuned",
        metavar="DIR",
        help="instead of the --lrs x --sizes grid, every model kind takes the best point of its own "
        "hyperparameter search, DIR/<kind>/optimization_results.yaml (kinds: unified, bespoke-<task>; "
        "python -m unirec.train -m hparams_search=... hydra.sweep.dir=DIR/<kind>); every kind needs the same "
        "number of finished trials",
    )
    ap.add_argument("--epochs", type=int, help="epochs per run (default: 5 for MovieLens, 3 for synthetic)")
    ap.add_argument(
        "--patience", type=int, help="stop a run after this many epochs without a better valid mean"
    )
    ap.add_argument("--work", default="runs/consolidation", help="run directories (reused when finished)")
    ap.add_argument("--out", default="reports", help="reports go to <out>/<suite-dir>/")
    ap.add_argument("--cache-dir", help="prepared-data cache (default: data.cache_dir / $UNIREC_CACHE)")
    ap.add_argument("--fresh", action="store_true", help="delete the work directory first")
    ap.add_argument(
        "--only-seeds",
        type=int,
        nargs="+",
        help="train and evaluate only these seeds and write no report: a second process on the same --work "
        "takes some seeds off the one that writes it (each run is locked, finished runs are reused)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training processes sharing the machine's cores, cpu_count // N torch threads each (each run is "
        "locked; every process takes the free runs longest first): one single-threaded run per core beats one run "
        "on every core for these small models",
    )
    ap.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)  # a --jobs helper process
    ap.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for every run, e.g. data.movielens.negative_sampling=popularity",
    )
    ap.add_argument(
        "--render", action="store_true", help="only rewrite the .md and .png from the saved .json"
    )
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data and 1 epoch (the slow test)")
    return ap
