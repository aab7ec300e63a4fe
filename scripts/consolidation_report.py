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

Finished runs are reused (``--work``, default ``runs/consolidation``), so an interrupted report resumes;
``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SIZES = {
    "S": {"embedding_dim": 16, "hidden_dim": 32},
    "M": {"embedding_dim": 32, "hidden_dim": 64},
    "W": {"embedding_dim": 64, "hidden_dim": 32},
}
"""Model sizes of the sweep (the core default is embedding 16, hidden 64); W, wide embeddings on a narrow
tower, is the MovieLens recipe (conf/experiment/ml100k.yaml)."""
ML_TASKS = ("home", "related", "search", "genre")


@dataclass
class Suite:
    name: str
    title: str
    overrides: List[str]
    tasks: Dict[str, str]
    """Task name -> its config entry for ``task=[...]``."""
    headline: str
    """Protocol that selects and that the acceptance reads: ``full`` or ``sampled``."""
    protocols: Tuple[str, ...]
    epochs: int
    notes: List[str] = field(default_factory=list)


def suites(args) -> Dict[str, Suite]:
    """MovieLens-100K and the synthetic canvases at relatedness 1.0, 0.0 and any other named in
    ``args.suites`` (``synthetic-<r>``)."""
    raw = str(Path(args.raw_dir).resolve()) if args.raw_dir else None
    cache = [f"data.cache_dir={Path(args.cache_dir).resolve()}"] if args.cache_dir else []
    common = [f"loader.batch_size={args.batch_size}", *cache, *args.set]
    ml_notes = [
        "Data: MovieLens-100K, the documented canvas derivation (README, `unirec/data/movielens.py`): "
        "leave-last-out per user; every valid/test event is one request on each of the four canvases.",
        "Split: each user's ratings sorted stably by timestamp, ties in the file's order (the standard "
        "leave-one-out split, pinned by its sha256 in tests); the last is test, the second-to-last valid. "
        "Full ranking: a test request's item against all 1,682 items minus the user's train and valid items "
        "(a valid request: minus the train items) when the request has a user (home, search, genre; "
        "`related` requests carry no user). "
        "Sampled: the positive plus 100 items the user never interacted with (NCF protocol; "
        "HR@10 = recall@10 with one positive).",
    ]
    named = [n[len(SYNTHETIC) :] for n in getattr(args, "suites", ()) if n.startswith(SYNTHETIC)]
    rs = dict.fromkeys(["1.0", "0.0", *(relatedness(r) for r in named)])
    return {
        "ml100k": Suite(
            "ml100k",
            "MovieLens-100K",
            ["data=movielens", f"data.raw_dir={raw}", *common],
            {t: f"movielens/{t}" for t in ML_TASKS},
            "full",
            ("full", "sampled"),
            args.epochs or (1 if args.quick else 5),
            ml_notes,
        ),
        **{f"{SYNTHETIC}{r}": synthetic_suite(r, args, common) for r in rs},
    }


SYNTHETIC = "synthetic-"
"""Prefix of the synthetic suites' names: ``synthetic-<relatedness>``."""


def relatedness(text: str) -> str:
    """A suite name's relatedness, spelt as a float ("1" -> "1.0"); outside [0, 1] is an error."""
    try:
        r = float(text)
    except ValueError:
        raise ValueError(f"suite {SYNTHETIC}{text}: the relatedness must be a number in [0, 1]") from None
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"suite {SYNTHETIC}{text}: the relatedness must be in [0, 1]")
    return str(r)


def synthetic_suite(r: str, args, common: Sequence[str]) -> Suite:
    """The synthetic canvases at relatedness ``r`` (data.synthetic.relatedness)."""
    syn = [f"data.synthetic.{k}={v}" for k, v in SYNTHETIC_SIZE[args.quick].items()]
    shared = {"1.0": "(one latent taste shared by every canvas).", "0.0": "(the canvases share nothing)."}
    return Suite(
        f"{SYNTHETIC}{r}",
        f"synthetic canvases, relatedness {r}",
        [f"data.synthetic.relatedness={r}", *syn, *common],
        {t: t for t in ML_TASKS},
        "sampled",
        ("sampled",),
        args.epochs or (1 if args.quick else 3),
        [
            f"Data: the generated canvases (`unirec/data/synthetic.py`) with relatedness {r} "
            + shared.get(r, f"(a share {r} of each user's taste variance is common to every canvas).")
            + " Sizes: "
            + ", ".join(syn)
            + ".",
            "Protocol: the logged impressions of each test request (clicks among the shown slate).",
        ],
    )


def suite_dir(name: str) -> str:
    """Where a suite's report goes under --out: ml100k, or synthetic/relatedness-<r>."""
    return name if name == "ml100k" else f"synthetic/relatedness-{name[len(SYNTHETIC) :]}"


SYNTHETIC_SIZE = {
    False: {"n_users": 2000, "n_items": 1000, "requests_per_task": 8000},
    True: {"n_users": 300, "n_items": 200, "requests_per_task": 600, "slate_min": 5, "slate_max": 8},
}


# ----------------------------------------------------------------------------------------------- training


def compose(
    suite: Suite, tasks: Optional[Sequence[str]], lr: float, size: str, seed: int, extra: Sequence[str] = ()
):
    """The run's config; ``tasks=None`` keeps the task list of ``suite.overrides`` (or conf/train.yaml)."""
    from unirec.config import compose as compose_cfg

    model = [f"model.{k}={v}" for k, v in SIZES[size].items()]
    task = [] if tasks is None else [f"task=[{','.join(suite.tasks[t] for t in tasks)}]"]
    return compose_cfg([*suite.overrides, *task, f"optim.lr={lr}", *model, f"seed={seed}", *extra])


def trainer_overrides(suite: Suite, cfg, features: Path) -> List[str]:
    """``suite.epochs`` epochs of a run's own train rows as steps, checked (validation, checkpoint) every
    epoch: the length the advisor takes its fraction of (``advise.fraction`` of ``trainer.max_steps``); the
    report's own runs set ``trainer.epochs`` (and ``trainer.patience``) instead."""
    from unirec.data.loader import count_rows, shard_files

    rows = sum(count_rows(shard_files(features, "train", t)) for t in cfg.task)
    epoch = max(1, math.ceil(rows / cfg.loader.batch_size))
    return [f"trainer.max_steps={epoch * suite.epochs}", f"trainer.eval_every={epoch}",
            f"trainer.checkpoint_every={epoch}", "trainer.best_metric=mean/ndcg@10", "trainer.keep_checkpoints=1",
            "trainer.progress=false", f"trainer.log_every={max(1, epoch // 2)}"]  # fmt: skip


def train(
    suite: Suite,
    tasks: Optional[Sequence[str]],
    lr: float,
    size: str,
    seed: int,
    run_dir: Path,
    args,
    extra: Sequence[str] = (),
) -> Dict:
    """Train (or reuse) one run; returns its metrics.json plus the wall time. ``extra``: further overrides
    (after the suite's, the learning rate, the size and the seed)."""
    from omegaconf import OmegaConf

    from unirec.data.prepare import prepare
    from unirec.train import run

    done = run_dir / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it over (its data set is cached)
    patience = [f"trainer.patience={args.patience}"] if getattr(args, "patience", None) else []
    trainer = [f"trainer.epochs={suite.epochs}", "trainer.best_metric=mean/ndcg@10", "trainer.keep_checkpoints=1",
               "trainer.progress=false", "trainer.log_every=100", *patience]  # fmt: skip
    cfg = compose(suite, tasks, lr, size, seed, [*extra, *trainer])
    features = prepare(cfg.data, cfg.task, cfg.seed)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    t0 = time.perf_counter()
    run(cfg, run_dir, features)
    wall = time.perf_counter() - t0
    metrics = json.loads(done.read_text())
    metrics["wall_seconds"] = round(wall, 2)
    done.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


@contextlib.contextmanager
def run_lock(run_dir: Path, wait: bool = True):
    """An exclusive lock on one run (a file beside its directory), so processes sharing a work directory
    (``--jobs``, ``--only-seeds``) never train or evaluate the same run at once. Yields True once held;
    with ``wait=False`` it yields False at once where another process holds it."""
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def evaluate(
    run_dir: Path, split: str, protocols: Sequence[str], baselines: bool = False, baseline_cache=None
) -> Dict:
    """Per protocol -> {model, popularity} -> task -> metrics, cached beside the run; the baselines' figures
    also under ``baseline_cache``, shared by the seeds whose data give them the same inputs."""
    from unirec.evaluate import run as eval_run

    baselines = baselines and "full" in protocols  # popularity over all canvases and BPR-MF
    cache = run_dir / f"eval-{split}-{'-'.join(protocols)}{'-baselines' if baselines else ''}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    res = eval_run(
        run_dir, split, protocols, checkpoint="best", baselines=baselines, baseline_cache=baseline_cache
    )
    cache.write_text(json.dumps(res, indent=2, sort_keys=True))
    return res


def per_task(run_dir: Path, tasks: Sequence[str], protocols: Sequence[str]) -> Dict:
    """A unified run as environments that each serve their own task's best step (``best:<task>``, as
    ``python -m unirec.export RUN --checkpoint best:<task>`` exports it): which checkpoint each task takes
    and, for every checkpoint other than the best-mean one, the model's test figures there (the best-mean
    checkpoint's are the run's own evaluation). Cached beside the run."""
    from unirec.evaluate import run as eval_run
    from unirec.export import ArtifactError, checkpoint_dir

    cache = run_dir / f"eval-test-per-task-{'-'.join(protocols)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    best = checkpoint_dir(run_dir, "best").name
    steps = {}
    for t in tasks:
        try:
            steps[t] = checkpoint_dir(run_dir, f"best:{t}").name
        except ArtifactError:  # a run from before per-task pointers: its best-mean checkpoint
            steps[t] = best
    out: Dict = {"best": best, "steps": steps, "figures": {}}
    for step in sorted(set(steps.values()) - {best}):
        mine = [t for t in tasks if steps[t] == step]  # only the tasks served from this step
        res = eval_run(run_dir, "test", protocols, checkpoint=step, popularity=False, tasks=mine)
        out["figures"][step] = {p: res["protocols"][p]["model"] for p in protocols}
    cache.write_text(json.dumps(out, indent=2, sort_keys=True))
    return out


def at_own_step(res: Dict, protocol: str, task: str) -> Dict:
    """A unified run's figures for ``task`` at the checkpoint best for it (:func:`per_task`)."""
    own = res["per_task"]
    step = own["steps"][task]
    if step == own["best"]:
        return res["protocols"][protocol]["model"][task]
    return own["figures"][step][protocol][task]


def headline(res: Dict, suite: Suite, task: str, who: str = "model") -> float:
    return res["protocols"][suite.headline][who][task]["ndcg@10"]


# ---------------------------------------------------------------------------------------------- footprint


# The process's own peak RSS in MB: VmHWM, not getrusage's ru_maxrss, which Linux carries over from the
# parent across fork and exec (the child would report this script's peak).
_PEAK_RSS = (
    "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024)\n"
)


def footprint(run_dir: Path, registry: Path) -> Dict:
    """Artifact bytes and the serving process's peak RSS for the run's chosen checkpoint."""
    from unirec.export import export

    marker = run_dir / "artifact.json"
    if marker.exists():
        return json.loads(marker.read_text())
    art = export(run_dir, registry, "best")
    size = sum(f.stat().st_size for f in art.rglob("*") if f.is_file())
    code = f"import sys\nfrom unirec.serve.scorer import Scorer\ns = Scorer.load(sys.argv[1])\n{_PEAK_RSS}"
    out = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, check=True)
    info = {"artifact": str(art), "artifact_bytes": size, "serving_rss_mb": float(out.stdout.strip())}
    marker.write_text(json.dumps(info))
    return info


def bare_rss_mb() -> float:
    """Peak RSS of a process that imports the serving code and loads nothing: the per-process floor."""
    code = f"import unirec.serve.scorer\n{_PEAK_RSS}"
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


# ------------------------------------------------------------------------------------------------- report


BASELINES = ("popularity_all", "bpr_mf", "transitions")
"""Baselines of the full protocol beside the task's own popularity (:mod:`unirec.baselines`)."""


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p of the paired t-test of a against b over seeds (1.0 when every difference is 0)."""
    from scipy import stats

    d = np.asarray(a) - np.asarray(b)
    if len(d) < 2 or not np.any(d):
        return 1.0
    if np.all(d == d[0]):
        return 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def mean_std(xs: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def fmt(xs: Sequence[float]) -> str:
    m, s = mean_std(xs)
    return f"{m:.4f} ± {s:.4f}"


def run_suite(suite: Suite, args) -> Dict:
    work = Path(args.work) / suite.name
    grid = [(lr, size) for lr in args.lrs for size in args.sizes]
    tasks = list(suite.tasks)
    started = time.perf_counter()
    log = lambda msg: print(f"[{suite.name} {time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731

    def run_dir(kind: str, lr: float, size: str, seed: int) -> Path:
        return work / f"{kind}-lr{lr:g}-{size}-s{seed}"

    def kinds():
        return [("unified", tasks)] + [(f"bespoke-{t}", [t]) for t in tasks]

    def run_and_evaluate(run, split: str, wait: bool = True):
        """Train (or reuse) one (kind, tasks, lr, size, seed) run and evaluate it on ``split`` under its
        lock -> (run dir, metrics, evaluation); None where another process holds it and ``wait`` is False."""
        kind, ts, lr, size, seed = run
        d = run_dir(kind, lr, size, seed)
        with run_lock(d, wait) as mine:  # another process of the report may be on this run: it is reused
            if not mine:
                return None
            m = train(suite, ts, lr, size, seed, d, args)
            if split == "valid":
                return d, m, evaluate(d, "valid", (suite.headline,))
            # The baselines depend on the data only, which the seed's unified run holds in full.
            res = evaluate(d, "test", suite.protocols, kind == "unified", work / "baselines")
            if kind == "unified":
                res = {**res, "per_task": per_task(d, ts, suite.protocols)}
            return d, m, res

    def take_free(runs, split: str) -> None:
        """Train and evaluate every run no other process holds, longest first (unified before bespoke;
        seed order within each), so processes sharing the work (``--jobs``) end within about one short
        bespoke run of each other instead of one waiting out another's unified run."""
        for run in sorted(runs, key=lambda r: -len(r[1])):
            run_and_evaluate(run, split, wait=False)

    # A helper process (--jobs) takes the runs free at the time, longest first, and writes no report.
    helper = getattr(args, "helper", False)
    # A process that only takes some seeds needs no sweep where the grid has one point: nothing to choose.
    only = getattr(args, "only_seeds", None)
    sweeping = [] if (only or helper) and len(grid) == 1 else grid
    sweep_runs = [(kind, ts, lr, size, 0) for lr, size in sweeping for kind, ts in kinds()]
    if helper:
        take_free(sweep_runs, "valid")
    # 1. sweep with seed 0, selected on valid
    sweep: Dict[str, Dict[str, float]] = {}
    for run in sweep_runs:
        kind, ts, lr, size, _ = run
        _, _, valid = run_and_evaluate(run, "valid")
        point = f"lr={lr:g} size={size}"
        sweep.setdefault(kind, {})[point] = float(np.mean([headline(valid, suite, t) for t in ts]))
        log(f"sweep {kind} {point}: valid ndcg@10 {sweep[kind][point]:.4f}")
    chosen = {}
    for kind, _ in kinds():
        best = max(grid, key=lambda g: sweep.get(kind, {}).get(f"lr={g[0]:g} size={g[1]}", 0.0))
        chosen[kind] = best
    seed_runs = [
        (kind, ts, *chosen[kind], seed) for seed in only or range(args.seeds) for kind, ts in kinds()
    ]
    take_free(seed_runs, "test")
    if helper:
        log("helper done: the runs it took are trained and evaluated")
        return None
    # 2. seeds, 3. test
    test: Dict[str, List[Dict]] = {}
    meta: Dict[str, List[Dict]] = {}
    for run in seed_runs:
        kind, ts, seed = run[0], run[1], run[4]
        d, m, res = run_and_evaluate(run, "test")
        test.setdefault(kind, []).append(res)
        meta.setdefault(kind, []).append(
            {"run": str(d), **{k: m.get(k) for k in ("parameters", "wall_seconds", "steps", "best")}}
        )
        log(f"seed {seed} {kind}: test {suite.headline} ndcg@10 "
            + " ".join(f"{t}={headline(res, suite, t):.4f}" for t in ts))  # fmt: skip
    if only:
        log(f"seeds {only} done; the report is written by the process that runs them all")
        return None
    # 4. footprint of seed 0's chosen runs
    registry = work / "registry"
    foot = {kind: footprint(Path(meta[kind][0]["run"]), registry / kind) for kind, _ in kinds()}
    floor = bare_rss_mb()
    log("footprint measured")
    return summarise(suite, args, sweep, chosen, test, meta, foot, floor, time.perf_counter() - started)


def summarise(suite, args, sweep, chosen, test, meta, foot, floor, seconds) -> Dict:
    tasks = list(suite.tasks)
    metrics = {"full": ("ndcg@10", "recall@10", "mrr"), "sampled": ("ndcg@10", "recall@10", "auc")}
    table = {}
    for protocol in suite.protocols:
        for t in tasks:
            for metric in metrics[protocol]:
                if metric not in test["unified"][0]["protocols"][protocol]["model"][t]:
                    continue
                u = [r["protocols"][protocol]["model"][t][metric] for r in test["unified"]]
                b = [r["protocols"][protocol]["model"][t][metric] for r in test[f"bespoke-{t}"]]
                p = [r["protocols"][protocol]["popularity"][t][metric] for r in test["unified"]]
                table[(protocol, t, metric)] = {"unified": u, "bespoke": b, "popularity": p}
                if all("per_task" in r for r in test["unified"]):
                    own = [at_own_step(r, protocol, t)[metric] for r in test["unified"]]
                    table[(protocol, t, metric)]["unified_own_step"] = own
                for base in BASELINES:  # trained on the unified run's data, so one per seed
                    runs = [r["protocols"][protocol].get(base, {}).get(t) for r in test["unified"]]
                    if all(runs):
                        table[(protocol, t, metric)][base] = [x[metric] for x in runs]
    bespoke_kinds = [f"bespoke-{t}" for t in tasks]
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
    if all("per_task" in r for r in test["unified"]):  # one export per environment, at its task's best step
        steps = len(set(test["unified"][0]["per_task"]["steps"].values()))
        fp["artifact_bytes_own_steps"] = (
            steps * foot["unified"]["artifact_bytes"],
            sum(foot[k]["artifact_bytes"] for k in bespoke_kinds),
        )
    out = {
        "suite": suite.name,
        "title": suite.title,
        "seeds": args.seeds,
        "epochs": suite.epochs,
        "patience": getattr(args, "patience", None),
        "validation": validation_of(Path(meta["unified"][0]["run"])),
        "grid": {"lr": args.lrs, "size": {s: SIZES[s] for s in args.sizes}},
        "sweep_valid_ndcg@10": sweep,
        "chosen": {k: {"lr": v[0], "size": v[1]} for k, v in chosen.items()},
        "test": {"|".join(k): v for k, v in table.items()},
        "footprint": fp,
        "own_steps": [
            {k: r["per_task"][k] for k in ("best", "steps")} for r in test["unified"] if "per_task" in r
        ],
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


def checked(res: Dict) -> str:
    """The report's words for how its runs validated (older results did not record it)."""
    v = res.get("validation")
    if v is None:
        return "validation cadence not recorded"
    every = "every epoch" if v["every_epochs"] == 1 else f"every {v['every_epochs']} epochs"
    protocol = "full ranking" if v["protocol"] == "full" else "the logged candidates"
    return f"checked {every} by {protocol}"


def write_markdown(res: Dict, suite: Suite, path: Path) -> None:
    tasks = list(suite.tasks)
    lines = [f"# Consolidation report: {res['title']}", ""]
    lines += [f"Generated by `{res['command']}` in {res['seconds'] / 60:.1f} min "
              f"({res['seeds']} seeds; mean ± std over seeds; test split).", ""]  # fmt: skip
    if res.get("notes_on_time"):  # how the wall time was taken, where the run was not one quiet process
        lines += [f"Wall time: {res['notes_on_time']}", ""]
    lines += [line for note in res.get("amended", []) for line in (f"> {note}", "")]  # added after the run
    lines += [f"- {n}" for n in suite.notes]
    lines += [
        f"- Training: every run trains up to {res['epochs']} epochs over its own data"
        + (
            f", stops after {res['patience']} validations without a better validation mean,"
            if res.get("patience")
            else ""
        )
        + f" and keeps the checkpoint with the best validation NDCG@10 ({checked(res)}). Bespoke = the same "
        "code trained on one task's data only.",
        "",
        "## Verdict on the headline metric",
        "",
        f"Headline: {'full-ranking' if suite.headline == 'full' else 'logged-impression'} NDCG@10, test.",
        "",
        "| task | unified | bespoke | popularity (task) | popularity (all canvases) | BPR-MF | transitions "
        "| lift vs bespoke | unified ≥ bespoke | paired wins | p (paired t over seeds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in tasks:
        c = res["test"][f"{suite.headline}|{t}|ndcg@10"]
        mu, mb = np.mean(c["unified"]), np.mean(c["bespoke"])
        wins = sum(u >= b for u, b in zip(c["unified"], c["bespoke"]))
        bases = " | ".join(fmt(c[k]) if k in c else "n/a" for k in BASELINES)
        lines.append(
            f"| {t} | {fmt(c['unified'])} | {fmt(c['bespoke'])} | {fmt(c['popularity'])} | {bases} | "
            f"{(mu - mb) / mb * 100:+.1f}% | {'yes' if mu >= mb else '**no**'} | {wins}/{len(c['unified'])} | "
            f"{paired_p(c['unified'], c['bespoke']):.3f} |"
        )
    lines += ["", "p < 0.05: the difference between unified and bespoke is significant over the seeds (paired "
              "t-test; every seed pairs a unified and a bespoke run on the same data). BPR-MF ranks only tasks "
              "whose requests carry a user, transitions (what came next after the user's recent items) only "
              "tasks whose requests carry a history; popularity (all canvases) counts every canvas's train "
              "engagements.",
              ""]  # fmt: skip
    lines += own_step_section(res, suite)
    lines += ["", "## Observations (computed from the figures above)", ""]
    lines += [f"- {o}" for o in observations(res, suite)]
    for protocol in suite.protocols:
        name = {
            "full": "Full ranking (all items minus the user's earlier items: train and valid for a test request)",
            "sampled": "Sampled / logged candidates",
        }
        lines += [
            "",
            f"## {name[protocol]}",
            "",
            "| task | metric | unified | unified, own step | bespoke | popularity | lift |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, c in res["test"].items():
            p, t, metric = key.split("|")
            if p != protocol:
                continue
            mu, mb = np.mean(c["unified"]), np.mean(c["bespoke"])
            label = (
                "HR@10" if (p == "sampled" and metric == "recall@10" and suite.name == "ml100k") else metric
            )
            own = fmt(c["unified_own_step"]) if "unified_own_step" in c else "n/a"
            lines.append(f"| {t} | {label} | {fmt(c['unified'])} | {own} | {fmt(c['bespoke'])} | {fmt(c['popularity'])} | "
                         f"{(mu - mb) / mb * 100:+.1f}% |")  # fmt: skip
    fp = res["footprint"]
    lines += ["", "## Footprint: one unified model against the sum of the bespoke ones", "",
              "| | unified | sum of bespoke | ratio |", "|---|---|---|---|"]  # fmt: skip
    labels = {
        "parameters": "parameters",
        "train_seconds": "training wall time, s (mean over seeds; includes per-epoch validation)",
        "artifact_bytes": "artifact bytes (exported)",
        "serving_rss_mb": "serving memory, MB (peak RSS of a process that loads and warms it; one per model)",
        "serving_rss_over_floor_mb": f"serving memory above a bare process ({res['serving_floor_rss_mb']:.0f} MB), MB",
        "artifact_bytes_own_steps": "artifact bytes, one export per environment at its task's own step (seed 0's "
        "distinct checkpoints)",
    }
    for k in [k for k in labels if k in fp]:
        u, b = fp[k]
        lines.append(f"| {labels[k]} | {u:,.1f} | {b:,.1f} | {_ratio(u, b)} |" if isinstance(u, float) else
                     f"| {labels[k]} | {u:,} | {b:,} | {_ratio(u, b)} |")  # fmt: skip
    lines += ["", "## Equal tuning: validation NDCG@10 of the sweep (seed 0)", "",
              "Each model kind picks its best grid point; sizes: "
              + ", ".join(f"{s} = embedding {v['embedding_dim']}, hidden {v['hidden_dim']}"
                          for s, v in sorted(res["grid"]["size"].items(), key=lambda kv: kv[1]["hidden_dim"])) + ".",
              "", "| model | " + " | ".join(next(iter(res["sweep_valid_ndcg@10"].values()))) + " | chosen |",
              "|---|" + "---|" * (len(next(iter(res["sweep_valid_ndcg@10"].values()))) + 1)]  # fmt: skip
    for kind, by in res["sweep_valid_ndcg@10"].items():
        ch = res["chosen"][kind]
        lines.append(
            f"| {kind} | "
            + " | ".join(f"{v:.4f}" for v in by.values())
            + f" | lr={ch['lr']:g} size={ch['size']} |"
        )
    lines += ["", "![per-task NDCG@10](consolidation.png)", ""]
    path.write_text("\n".join(lines))


def own_step_section(res: Dict, suite: Suite) -> List[str]:
    """The unified run served at each task's own best validation step against the bespoke models, which
    already stop at theirs."""
    cells = {t: res["test"][f"{suite.headline}|{t}|ndcg@10"] for t in suite.tasks}
    if not all("unified_own_step" in c for c in cells.values()):
        return []
    n = len(res.get("own_steps", []))
    moved = {t: sum(s["steps"][t] != s["best"] for s in res["own_steps"]) for t in suite.tasks}
    lines = ["", "## Unified, each environment at its own task's best step", "",
             "The same joint runs, each task taken at the checkpoint best for it on validation (what "
             "`python -m unirec.export RUN --checkpoint best:<task>` exports for that task's environment), "
             "instead of the one checkpoint best on the validation mean over tasks. The bespoke models already "
             "stop at their own task's best step, so this pairs like with like; the cost is one export per "
             "distinct step (footprint below).", "",
             "| task | unified, one checkpoint | unified, own step | bespoke | lift vs bespoke | own step ≥ bespoke "
             "| paired wins | p (paired t over seeds) | seeds at another step |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for t, c in cells.items():
        mo, mb = np.mean(c["unified_own_step"]), np.mean(c["bespoke"])
        wins = sum(u >= b for u, b in zip(c["unified_own_step"], c["bespoke"]))
        lines.append(
            f"| {t} | {fmt(c['unified'])} | {fmt(c['unified_own_step'])} | {fmt(c['bespoke'])} | "
            f"{(mo - mb) / mb * 100:+.1f}% | {'yes' if mo >= mb else '**no**'} | {wins}/{len(c['bespoke'])} | "
            f"{paired_p(c['unified_own_step'], c['bespoke']):.3f} | {moved[t]}/{n} |"
        )
    return lines


def observations(res: Dict, suite: Suite) -> List[str]:
    """Plain statements read off the results, so the report says where the verdict is weak."""
    out = []
    cells = {t: res["test"][f"{suite.headline}|{t}|ndcg@10"] for t in suite.tasks}
    means = {t: {k: float(np.mean(v)) for k, v in c.items()} for t, c in cells.items()}
    losing = [t for t, m in means.items() if m["unified"] < m["bespoke"]]
    out.append(
        "Unified ≥ bespoke on the mean over seeds for every task."
        if not losing
        else f"Unified is below bespoke on the mean over seeds for: {', '.join(losing)}."
    )
    for t, c in cells.items():
        wins = sum(u >= b for u, b in zip(c["unified"], c["bespoke"]))
        gap = means[t]["unified"] - means[t]["bespoke"]
        spread = (
            max(np.std(c["unified"], ddof=1), np.std(c["bespoke"], ddof=1)) if len(c["unified"]) > 1 else 0.0
        )
        n = len(c["unified"])
        if abs(gap) < spread:
            out.append(
                f"{t}: the difference ({gap:+.4f}) is within the seed spread (std up to {spread:.4f}; unified "
                f"ahead in {wins}/{n} paired seeds), so it is not a reliable win either way."
            )
        elif 0 < wins < n:
            out.append(f"{t}: the mean difference ({gap:+.4f}) exceeds the spread, but the seeds disagree "
                       f"(unified ahead in {wins}/{n}).")  # fmt: skip
        elif gap < 0:
            out.append(f"{t}: bespoke wins in every seed ({gap:+.4f}): consolidation costs this task here.")
    own = [t for t, c in cells.items() if "unified_own_step" in c]
    if own:
        behind = [t for t in own if means[t]["unified_own_step"] < means[t]["bespoke"]]
        significant = [t for t in own if paired_p(cells[t]["unified_own_step"], cells[t]["bespoke"]) < 0.05]
        out.append(
            "At each task's own best step, unified ≥ bespoke on the mean for every task"
            if not behind
            else f"At each task's own best step, unified is below bespoke on the mean for: {', '.join(behind)}"
        )
        out[-1] += f"; significant (p < 0.05) on: {', '.join(significant) or 'none'}."
    for t, m in means.items():
        bases = {k: m[k] for k in ("popularity", *BASELINES) if k in m}
        strongest = max(bases, key=bases.get)
        verdict = "beats" if m["unified"] > bases[strongest] else "does **not** beat"
        out.append(f"{t}: the unified model ({m['unified']:.4f}) {verdict} the strongest baseline, "
                   f"{strongest} ({bases[strongest]:.4f}; {m['unified'] / bases[strongest]:.2f}x).")  # fmt: skip
    below = [t for t, m in means.items() if max(m["unified"], m["bespoke"]) < m["popularity"]]
    if below:
        out.append(f"Neither model beats popularity on {', '.join(below)}: the learned models add nothing to "
                   "the item prior there yet.")  # fmt: skip
    for kind, ch in res["chosen"].items():
        lrs = sorted(res["grid"]["lr"])
        sizes = sorted(
            res["grid"]["size"],
            key=lambda k: (res["grid"]["size"][k]["hidden_dim"], res["grid"]["size"][k]["embedding_dim"]),
        )
        edge = [
            n
            for n, v, axis in (("lr", ch["lr"], lrs), ("size", ch["size"], sizes))
            if len(axis) > 1 and v == axis[-1]
        ]
        if edge:
            out.append(
                f"{kind} chose the largest {' and '.join(edge)} of the grid: a wider sweep could still move it."
            )
    fp = res["footprint"]
    out.append(
        f"Footprint: the unified model has {fp['parameters'][0] / fp['parameters'][1]:.2f}x the parameters, "
        f"{fp['artifact_bytes'][0] / fp['artifact_bytes'][1]:.2f}x the artifact bytes and "
        f"{fp['serving_rss_mb'][0] / fp['serving_rss_mb'][1]:.2f}x the serving memory of the four bespoke models "
        f"together, and trains in {fp['train_seconds'][0] / fp['train_seconds'][1]:.2f}x their summed time."
    )
    return out


def _ratio(u: float, b: float) -> str:
    return f"{u / b:.2f}" if b else "n/a"


def write_chart(res: Dict, suite: Suite, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(suite.tasks)
    fig, axes = plt.subplots(
        1, len(suite.protocols), figsize=(5.5 * len(suite.protocols), 3.6), squeeze=False
    )
    for ax, protocol in zip(axes[0], suite.protocols):
        x = np.arange(len(tasks))
        for i, (who, colour) in enumerate(
            (("unified", "#1f77b4"), ("bespoke", "#ff7f0e"), ("popularity", "#999999"))
        ):
            vals = [res["test"][f"{protocol}|{t}|ndcg@10"][who] for t in tasks]
            ax.bar(x + (i - 1) * 0.27, [np.mean(v) for v in vals], 0.27, yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
                   label=who, color=colour, capsize=2)  # fmt: skip
        ax.set_xticks(x, tasks)
        ax.set_title(f"{res['title']}: {protocol} NDCG@10 (test)", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line (scripts/advisor_validation.py builds its measurement settings from it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        help="training processes sharing the machine's cores (each run is locked; every process takes the free "
        "runs longest first): one single-threaded run per core beats one run on every core for these small models",
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


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.seeds < 2:
        ap.error("--seeds must be at least 2 (the report gives mean ± std)")
    if args.fresh and Path(args.work).exists():
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
    helpers = [] if args.render or args.helper else start_helpers(args, argv)
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
    for proc, path in helpers:
        if proc.wait() != 0:
            sys.exit(f"a --jobs helper failed (exit {proc.returncode}); its log: {path}")
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min")


def start_helpers(args, argv) -> list:
    """``--jobs N``: N-1 helper processes of this command (``--helper``), every process with an equal share
    of the cores as torch threads. Returns (process, log path) pairs; the logs lie in ``--work``."""
    if args.jobs <= 1:
        return []
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = []
    for i in range(1, args.jobs):
        path = Path(args.work) / f"helper-{i}.log"
        with open(path, "w") as log:
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--helper"]
            out.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), path))
    print(f"--jobs {args.jobs}: {args.jobs - 1} helper(s), {threads} torch thread(s) each; logs {args.work}/helper-*.log",
          flush=True)  # fmt: skip
    return out


if __name__ == "__main__":
    main()
