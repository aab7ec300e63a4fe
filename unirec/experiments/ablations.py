"""The ablation measurement: the variant table (every option against the pinned core default), its
suites, the runs of every variant and seed, and the recommendation read off their validation means
(see ``scripts/ablations.py`` for the protocol)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from unirec.experiments.runs import evaluate as evaluate_run
from unirec.experiments.runs import run_lock
from unirec.experiments.runs import train as train_run
from unirec.experiments.stats import mean
from unirec.experiments.suites import SIZES, SYNTHETIC_SIZE, Suite, compose

# ------------------------------------------------------------------------------------ the variant table

BASELINE: Dict[str, str] = {
    "model.tower": "cross",
    "loss.balancing": "static",
    "loader.mix": "natural",
    "data.impute": "false",
}
"""The core default, pinned. A key this version's config does not have yet is left out of the pins (the
option does not exist, so the default is what runs); the report lists it."""

AXES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "tower": ("model.tower", ("mlp", "dcn_v2", "mmoe", "ple", "task_conditioned")),
    "balancing": ("loss.balancing", ("uncertainty", "gradnorm")),
    "sampling": ("loader.mix", ("uniform", "temperature")),
    "imputation": ("data.impute", ("true",)),
}
"""Axis -> (override key, the values tried). Each variant is the baseline with one axis changed."""

LR = 0.03
SIZE = "S"
"""unirec.experiments.suites.SIZES: embedding 16, hidden 32."""
BATCH_SIZE = 1024
EPOCHS = {"ml100k": 3, "synthetic": 2}
ML_TASKS = ("home", "related", "search", "genre")
METRIC = "ndcg@10"
EXTRA_METRICS = ("recall@10", "mrr")
"""Also recorded when the protocol computes them (the sampled protocol of the synthetic canvases adds auc)."""
OUT_DIRS = {"ml100k": "ml100k", "synthetic": "synthetic"}


@dataclass(frozen=True)
class Variant:
    name: str
    """``baseline``, ``<axis>=<value>`` or ``combination``."""
    axis: str
    """An axis of :data:`AXES`, ``baseline`` or ``combination``."""
    changes: Tuple[Tuple[str, str], ...]
    """(key, value) overrides that differ from :data:`BASELINE`."""

    def overrides(self, pinned: Dict[str, str]) -> List[str]:
        return [f"{k}={v}" for k, v in {**pinned, **dict(self.changes)}.items()]

    @property
    def slug(self) -> str:
        """Run directory name: the same changes always reuse the same runs."""
        return "+".join(f"{k}={v}" for k, v in sorted(self.changes)).replace("/", "_") or "baseline"


def _portable(overrides: Sequence[str]) -> List[str]:
    """The suite's data overrides as a report may show them: no cache directory, and the raw directory
    relative to the working directory (no machine paths in a committed report)."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "data.cache_dir":
            continue
        if key == "data.raw_dir" and value and Path(value).is_absolute():
            value = os.path.relpath(value)
        out.append(f"{key}={value}")
    return out


def all_variants() -> List[Variant]:
    missing = [key for key, _ in AXES.values() if key not in BASELINE]
    if missing:
        raise ValueError(f"AXES keys {missing} have no baseline value in BASELINE")
    return [
        Variant(f"{axis}={v}", axis, ((key, v),))
        for axis, (key, values) in AXES.items()
        for v in values
        if v != BASELINE[key]
    ]


def select_variants(names: Optional[Sequence[str]]) -> List[Variant]:
    """``--variants``: ``<axis>`` (all its values), ``<axis>=<value>`` or ``<key>=<value>``; table order."""
    every = all_variants()
    if not names:
        return every
    keys = {key: axis for axis, (key, _) in AXES.items()}
    chosen = set()
    for n in names:
        axis, eq, value = n.partition("=")
        axis = keys.get(axis, axis)
        hits = [v for v in every if v.axis == axis and (not eq or v.name == f"{axis}={value}")]
        if not hits:
            known = ", ".join([*AXES, *(v.name for v in every)])
            raise ValueError(f"unknown variant {n!r} (a baseline value is not a variant); known: {known}")
        chosen.update(hits)
    return [v for v in every if v in chosen]


# ------------------------------------------------------------------------------------------------ suites


def suites(args) -> Dict[str, Suite]:
    """The suites' data overrides (tasks are read from the composed config by :func:`setup_suite`)."""
    raw = str(Path(args.raw_dir).resolve()) if args.raw_dir else None
    common = [f"loader.batch_size={BATCH_SIZE}", *getattr(args, "set", [])]
    if args.cache_dir:
        common.append(f"data.cache_dir={Path(args.cache_dir).resolve()}")
    syn = [f"data.synthetic.{k}={v}" for k, v in SYNTHETIC_SIZE[args.quick].items()]
    ml_tasks = ",".join(f"movielens/{t}" for t in ML_TASKS)
    epochs = lambda s: args.epochs or (1 if args.quick else EPOCHS[s])  # noqa: E731
    return {
        "ml100k": Suite(
            "ml100k",
            "MovieLens-100K",
            ["data=movielens", f"data.raw_dir={raw}", f"task=[{ml_tasks}]", *common],
            {},
            "full",
            ("full",),
            epochs("ml100k"),
            [
                "Data: MovieLens-100K, the documented canvas derivation (README, `unirec/data/movielens.py`): "
                "leave-last-out per user, every valid/test event one request on each canvas; the seed also "
                "draws the derivation, so runs of one seed share their data.",
                "Headline: test, full ranking (the positive against the whole catalogue minus the user's "
                "train items when the request has a user).",
            ],
        ),
        "synthetic": Suite(
            "synthetic",
            "synthetic canvases (default task list)",
            [*syn, *common],
            {},
            "sampled",
            ("sampled",),
            epochs("synthetic"),
            [
                "Data: the generated canvases (`unirec/data/synthetic.py`) with the default task list of "
                "conf/train.yaml; sizes " + ", ".join(syn) + ". The data stay those of data.synthetic.seed.",
                "Headline: test, the logged impressions of each request (clicks among the shown slate).",
            ],
        ),
    }


def _has_key(cfg, key: str) -> bool:
    obj = cfg
    for part in key.split("."):
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            obj = getattr(obj, part)
        else:
            return False
    return True


def recipe(args) -> Tuple[float, str]:
    """(learning rate, size name) of every run: ``--lr`` and ``--size``, else :data:`LR` and :data:`SIZE`."""
    return getattr(args, "lr", None) or LR, getattr(args, "size", None) or SIZE


def validation(suite, args) -> Dict:
    """How the runs validate (``trainer.eval_every_epochs``, ``trainer.valid_protocol``), from the config."""
    trainer = compose(suite, None, *recipe(args), 0).trainer
    return {"every_epochs": int(trainer.eval_every_epochs), "protocol": str(trainer.valid_protocol.value)}


def pins(suite, args=None) -> Tuple[Dict[str, str], List[str]]:
    """The baseline overrides this version's config accepts, and the keys it does not have yet."""
    cfg = compose(suite, None, *recipe(args), 0)
    kept = {k: v for k, v in BASELINE.items() if _has_key(cfg, k)}
    return kept, [k for k in BASELINE if k not in kept]


def preflight(suite, variants: Sequence[Variant], pinned: Dict[str, str], seed: int, args=None) -> List[str]:
    """Compose every variant and build its model before any training, so an option this version does not
    have fails now, naming the variant. Returns the task names (from the baseline's config)."""
    import torch.utils.tensorboard  # noqa: F401  (imported now, so the first run's wall time does not pay it)

    from unirec.data.prepare import prepare
    from unirec.model import MultiTaskRanker
    from unirec.schema import FeatureSpec

    features: Dict[str, Path] = {}
    tasks: List[str] = []
    for v in variants:
        try:
            cfg = compose(suite, None, *recipe(args), seed, v.overrides(pinned))
            key = repr(cfg.data) + repr(sorted(cfg.task))
            if key not in features:
                features[key] = prepare(cfg.data, cfg.task, cfg.seed)
            MultiTaskRanker(FeatureSpec.load(features[key] / "feature_spec.json"), cfg.model)
        except Exception as e:
            cause = f" ({e.__cause__})" if e.__cause__ else ""
            raise SystemExit(
                f"error: suite {suite.name}: variant {v.name} ({' '.join(v.overrides(pinned))}) "
                f"fails before training (an option this version does not have?): {type(e).__name__}: {e}{cause}"
            ) from e
        if not tasks:
            tasks = list(cfg.task)
    return tasks


# ------------------------------------------------------------------------------------------------ running


def train_and_test(
    suite, variant: Variant, pinned, seed: int, work: Path, args, log, wait: bool = True
) -> Optional[Dict]:
    """One run (trained, or reused when its settings match) and its test scores: a JSON-ready record.
    Under the run's lock (processes sharing ``--work`` never take the same run); with ``wait=False``,
    None at once where another process holds it."""
    d = work / f"{variant.slug}-s{seed}"
    with run_lock(d, wait) as mine:
        return _train_and_test(suite, variant, pinned, seed, d, args, log) if mine else None


def _train_and_test(suite, variant: Variant, pinned, seed: int, d: Path, args, log) -> Dict:
    key = {
        "suite": [o for o in suite.overrides if not o.startswith("data.cache_dir=")],
        "overrides": variant.overrides(pinned),
        "lr": recipe(args)[0],
        "size": SIZES[recipe(args)[1]],
        "epochs": suite.epochs,
        "patience": getattr(args, "patience", None),
        "seed": seed,
    }
    marker = d / "ablation.json"
    if d.exists() and (not marker.exists() or json.loads(marker.read_text()) != key):
        shutil.rmtree(d)  # interrupted, or trained with other settings
    reused = (d / "metrics.json").exists()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer's tables: one line per run instead
            m = train_run(suite, None, *recipe(args), seed, d, args, extra=variant.overrides(pinned))
            marker.write_text(json.dumps(key, indent=2))
            res = evaluate_run(d, "test", (suite.headline,))
    except Exception as e:
        raise RuntimeError(
            f"suite {suite.name}: variant {variant.name} ({' '.join(variant.overrides(pinned))}), "
            f"seed {seed} failed: {type(e).__name__}: {e}"
        ) from e
    if m["best"]["metric"] != f"mean/{METRIC}":
        raise RuntimeError(f"{d}: selected on {m['best']['metric']}, expected mean/{METRIC}")
    by = res["protocols"][suite.headline]
    keep = (METRIC, *EXTRA_METRICS, "auc")
    rec = {
        "seed": seed,
        "run": str(d),
        "valid": m["best"]["value"],
        "best_step": m["best"]["step"],
        "steps": m["steps"],
        "wall_seconds": m["wall_seconds"],
        "parameters": m["parameters"],
        "test": {t: {k: v for k, v in s.items() if k in keep} for t, s in by["model"].items()},
        "popularity": {t: s[METRIC] for t, s in by.get("popularity", {}).items()},
    }
    took = "reused" if reused else f"{time.perf_counter() - t0:.0f}s with test"
    log(f"{variant.name:<26} seed {seed}: train {m['wall_seconds']:6.1f}s ({took}); valid {rec['valid']:.4f}; "
        f"test {suite.headline} {METRIC} " + " ".join(f"{t}={s[METRIC]:.4f}" for t, s in rec["test"].items()))  # fmt: skip
    return rec


BASE = Variant("baseline", "baseline", ())


def setup_suite(suite, variants: List[Variant], args) -> Tuple[Dict[str, str], List[str]]:
    """Pins the baseline, reads the task names into ``suite.tasks`` and checks every variant can run;
    returns the pinned overrides and the keys left unpinned."""
    pinned, unpinned = pins(suite, args)
    tasks = preflight(suite, [BASE, *variants], pinned, args.seeds[0], args)
    suite.tasks = {t: t for t in tasks}
    print(f"[{suite.name}] tasks {', '.join(tasks)}; {1 + len(variants)} configurations x "
          f"{len(args.seeds)} seeds" + (f"; not in this version's config, so not pinned: {', '.join(unpinned)}"
                                        if unpinned else ""), flush=True)  # fmt: skip
    return pinned, unpinned


def run_suite(
    suite, variants: List[Variant], pinned: Dict[str, str], unpinned: List[str], args
) -> Optional[Dict]:
    """Every variant and seed, then the combination of the axis winners -> the report's record. A ``--jobs``
    helper (``args.helper``) takes the same runs where free, waits for the rest and returns None."""
    work = Path(args.work) / suite.name
    tasks = list(suite.tasks)
    started = time.perf_counter()
    log = lambda msg: print(f"[{suite.name} {time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    helper = getattr(args, "helper", False)
    entries: List[Dict] = []

    def run_all(vs: Sequence[Variant]) -> None:
        """Every seed of ``vs``: first the runs no other process holds (seed by seed, so an interrupted
        report has whole seeds done), then every record, waiting on the runs another process trains."""
        taken = {(v.name, s): train_and_test(suite, v, pinned, s, work, args, log, wait=False)
                 for s in args.seeds for v in vs}  # fmt: skip
        for v in vs:
            runs = [
                taken[v.name, s] or train_and_test(suite, v, pinned, s, work, args, log) for s in args.seeds
            ]
            entries.append({"name": v.name, "axis": v.axis, "changes": dict(v.changes), "runs": runs})

    run_all([BASE, *variants])
    # stage 2: the axis winners (validation only) and their combination
    base_valid = valid_mean(entries[0])
    winners = {}
    for axis in dict.fromkeys(v.axis for v in variants):
        best = max((e for e in entries if e["axis"] in (axis, "baseline")), key=valid_mean)
        winners[axis] = {"name": best["name"], "valid": valid_mean(best), "baseline_valid": base_valid}
    changes = tuple(kv for w in winners.values() for kv in next(e for e in entries if e["name"] == w["name"])["changes"].items())  # fmt: skip
    combo = {"changes": dict(changes), "trained": False, "same_as": None}
    same = [e["name"] for e in entries if e["changes"] == dict(changes)]
    if same:
        combo["same_as"] = same[0]
        log(f"combination of the axis winners = {same[0]}: nothing more to train")
    else:
        log(f"combination of the axis winners: {' '.join(f'{k}={v}' for k, v in changes)}")
        run_all([Variant("combination", "combination", changes)])
        combo["trained"] = True
    if helper:
        log("helper done: the runs it took are trained and tested")
        return None
    res = {
        "suite": suite.name,
        "title": suite.title,
        "notes": suite.notes,
        "tasks": tasks,
        "headline": suite.headline,
        "metric": METRIC,
        "settings": {
            "seeds": list(args.seeds),
            "epochs": suite.epochs,
            "lr": recipe(args)[0],
            **SIZES[recipe(args)[1]],
            "patience": getattr(args, "patience", None),
            "validation": validation(suite, args),
            "batch_size": BATCH_SIZE,
            "data": _portable(suite.overrides),
            "quick": bool(args.quick),
        },
        "baseline": pinned,
        "unpinned": unpinned,
        "entries": entries,
        "winners": winners,
        "combination": combo,
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(["python", "scripts/ablations.py", *sys.argv[1:]]),
    }
    res["recommended"] = recommend(res)
    return res


# ----------------------------------------------------------------------------------------------- figures


def valid_mean(e: Dict) -> float:
    """The mean over seeds of a variant's best validation mean over tasks."""
    return float(np.mean([r["valid"] for r in e["runs"]]))


def per_seed(e: Dict, task: Optional[str] = None, metric: str = METRIC) -> List[float]:
    """Test ``metric`` per seed of one task, or of the mean over tasks (``task=None``)."""
    if task is not None:
        return [r["test"][task][metric] for r in e["runs"]]
    return [float(np.mean([s[metric] for s in r["test"].values()])) for r in e["runs"]]


def recommend(res: Dict) -> Dict:
    """The configuration with the best validation mean (the baseline wins ties: a change must earn its
    place), and its test figures against the baseline, task by task."""
    entries = res["entries"]
    base = entries[0]
    best = base
    for e in entries[1:]:
        if valid_mean(e) > valid_mean(best):
            best = e
    tasks = []
    for t in res["tasks"]:
        r, b = per_seed(best, t), per_seed(base, t)
        tasks.append({"task": t, "recommended": mean(r), "baseline": mean(b), "delta": mean(r) - mean(b),
                      "at_least_baseline": mean(r) >= mean(b),
                      "paired_seeds_at_least": sum(x >= y for x, y in zip(r, b)), "seeds": len(r)})  # fmt: skip
    overrides = [f"{k}={v}" for k, v in best["changes"].items()]
    return {
        "name": best["name"],
        "changes": best["changes"],
        "overrides": " ".join(overrides),
        "valid": valid_mean(best),
        "baseline_valid": valid_mean(base),
        "tasks": tasks,
        "losing": [t["task"] for t in tasks if not t["at_least_baseline"]],
    }
