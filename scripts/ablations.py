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
again), so an interrupted report resumes; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
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
"""consolidation_report.SIZES: embedding 16, hidden 32."""
BATCH_SIZE = 1024
EPOCHS = {"ml100k": 3, "synthetic": 2}
ML_TASKS = ("home", "related", "search", "genre")
METRIC = "ndcg@10"
EXTRA_METRICS = ("recall@10", "mrr")
"""Also recorded when the protocol computes them (the sampled protocol of the synthetic canvases adds auc)."""
OUT_DIRS = {"ml100k": "ml100k", "synthetic": "synthetic"}


def _load_consolidation():
    """scripts/consolidation_report.py as a module (scripts/ is not a package)."""
    name = "consolidation_report"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


cr = _load_consolidation()


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


def suites(args) -> Dict[str, cr.Suite]:
    """The suites' data overrides (tasks are read from the composed config by :func:`setup_suite`)."""
    raw = str(Path(args.raw_dir).resolve()) if args.raw_dir else None
    common = [f"loader.batch_size={BATCH_SIZE}", *getattr(args, "set", [])]
    if args.cache_dir:
        common.append(f"data.cache_dir={Path(args.cache_dir).resolve()}")
    syn = [f"data.synthetic.{k}={v}" for k, v in cr.SYNTHETIC_SIZE[args.quick].items()]
    ml_tasks = ",".join(f"movielens/{t}" for t in ML_TASKS)
    epochs = lambda s: args.epochs or (1 if args.quick else EPOCHS[s])  # noqa: E731
    return {
        "ml100k": cr.Suite(
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
        "synthetic": cr.Suite(
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
    trainer = cr.compose(suite, None, *recipe(args), 0).trainer
    return {"every_epochs": int(trainer.eval_every_epochs), "protocol": str(trainer.valid_protocol.value)}


def pins(suite, args=None) -> Tuple[Dict[str, str], List[str]]:
    """The baseline overrides this version's config accepts, and the keys it does not have yet."""
    cfg = cr.compose(suite, None, *recipe(args), 0)
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
            cfg = cr.compose(suite, None, *recipe(args), seed, v.overrides(pinned))
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


def train_and_test(suite, variant: Variant, pinned, seed: int, work: Path, args, log) -> Dict:
    """One run (trained, or reused when its settings match) and its test scores: a JSON-ready record."""
    d = work / f"{variant.slug}-s{seed}"
    key = {
        "suite": [o for o in suite.overrides if not o.startswith("data.cache_dir=")],
        "overrides": variant.overrides(pinned),
        "lr": recipe(args)[0],
        "size": cr.SIZES[recipe(args)[1]],
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
            m = cr.train(suite, None, *recipe(args), seed, d, args, extra=variant.overrides(pinned))
            marker.write_text(json.dumps(key, indent=2))
            res = cr.evaluate(d, "test", (suite.headline,))
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


def run_suite(suite, variants: List[Variant], pinned: Dict[str, str], unpinned: List[str], args) -> Dict:
    work = Path(args.work) / suite.name
    tasks = list(suite.tasks)
    started = time.perf_counter()
    log = lambda msg: print(f"[{suite.name} {time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731
    baseline = BASE
    entries: List[Dict] = []

    def run_all(v: Variant) -> Dict:
        runs = [train_and_test(suite, v, pinned, s, work, args, log) for s in args.seeds]
        e = {"name": v.name, "axis": v.axis, "changes": dict(v.changes), "runs": runs}
        entries.append(e)
        return e

    for v in [baseline, *variants]:
        run_all(v)
    # stage 2: the axis winners (validation only) and their combination
    base_valid = _valid_mean(entries[0])
    winners = {}
    for axis in dict.fromkeys(v.axis for v in variants):
        best = max((e for e in entries if e["axis"] in (axis, "baseline")), key=_valid_mean)
        winners[axis] = {"name": best["name"], "valid": _valid_mean(best), "baseline_valid": base_valid}
    changes = tuple(kv for w in winners.values() for kv in next(e for e in entries if e["name"] == w["name"])["changes"].items())  # fmt: skip
    combo = {"changes": dict(changes), "trained": False, "same_as": None}
    same = [e["name"] for e in entries if e["changes"] == dict(changes)]
    if same:
        combo["same_as"] = same[0]
        log(f"combination of the axis winners = {same[0]}: nothing more to train")
    else:
        log(f"combination of the axis winners: {' '.join(f'{k}={v}' for k, v in changes)}")
        run_all(Variant("combination", "combination", changes))
        combo["trained"] = True
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
            **cr.SIZES[recipe(args)[1]],
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


def _valid_mean(e: Dict) -> float:
    return float(np.mean([r["valid"] for r in e["runs"]]))


def per_seed(e: Dict, task: Optional[str] = None, metric: str = METRIC) -> List[float]:
    """Test ``metric`` per seed of one task, or of the mean over tasks (``task=None``)."""
    if task is not None:
        return [r["test"][task][metric] for r in e["runs"]]
    return [float(np.mean([s[metric] for s in r["test"].values()])) for r in e["runs"]]


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs))


def _std(xs: Sequence[float]) -> float:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def fmt(xs: Sequence[float]) -> str:
    return f"{_mean(xs):.4f} ± {_std(xs):.4f}" if len(xs) > 1 else f"{_mean(xs):.4f}"


def _delta(a: float, b: float) -> str:
    return f"{a - b:+.4f} ({(a - b) / b * 100:+.1f}%)" if b else f"{a - b:+.4f}"


def _median_wall(e: Dict) -> float:
    return float(np.median([r["wall_seconds"] for r in e["runs"]]))


def recommend(res: Dict) -> Dict:
    """The configuration with the best validation mean (the baseline wins ties: a change must earn its
    place), and its test figures against the baseline, task by task."""
    entries = res["entries"]
    base = entries[0]
    best = base
    for e in entries[1:]:
        if _valid_mean(e) > _valid_mean(best):
            best = e
    tasks = []
    for t in res["tasks"]:
        r, b = per_seed(best, t), per_seed(base, t)
        tasks.append({"task": t, "recommended": _mean(r), "baseline": _mean(b), "delta": _mean(r) - _mean(b),
                      "at_least_baseline": _mean(r) >= _mean(b),
                      "paired_seeds_at_least": sum(x >= y for x, y in zip(r, b)), "seeds": len(r)})  # fmt: skip
    overrides = [f"{k}={v}" for k, v in best["changes"].items()]
    return {
        "name": best["name"],
        "changes": best["changes"],
        "overrides": " ".join(overrides),
        "valid": _valid_mean(best),
        "baseline_valid": _valid_mean(base),
        "tasks": tasks,
        "losing": [t["task"] for t in tasks if not t["at_least_baseline"]],
    }


# ------------------------------------------------------------------------------------------------ report


def write_markdown(res: Dict, path: Path) -> None:
    tasks, entries, rec = res["tasks"], res["entries"], res["recommended"]
    base = entries[0]
    st = res["settings"]
    seeds = st["seeds"]
    protocol = "full-ranking" if res["headline"] == "full" else "logged-impression"
    lines = [f"# Ablations: {res['title']}", ""]
    lines += [f"Generated by `{res['command']}` in {res['seconds'] / 60:.1f} min. Every figure is the mean "
              + (f"± std over {len(seeds)} seeds" if len(seeds) > 1 else "of 1 seed, no std")
              + f" (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}).", ""]  # fmt: skip
    if st.get("quick"):
        lines += ["**Quick mode** (tiny data, for the test): the figures say nothing about the options.", ""]
    lines += ["## Settings", ""]
    lines += [f"- {n}" for n in res["notes"]]
    steps = base["runs"][0]["steps"]
    lines += [
        f"- Tasks (from the composed config): {', '.join(tasks)}.",
        f"- Training, every run alike: lr {st['lr']:g}, embedding {st['embedding_dim']}, hidden "
        f"{st['hidden_dim']}, batch {st['batch_size']}, {st['epochs']} epoch{'s' if st['epochs'] > 1 else ''} "
        f"({steps} steps for the baseline)"
        + (f", stopping after {st['patience']} validations without a better mean" if st.get("patience") else "")
        + f", the checkpoint with the best validation mean {METRIC} kept and tested "
        f"({cr.checked({'validation': st.get('validation')}) if st.get('validation') else 'checked every epoch'}).",
        "- Baseline (the core default, pinned): `" + " ".join(f"{k}={v}" for k, v in res["baseline"].items()) + "`."
        + (f" Not in this version's config, so not pinned: {', '.join(res['unpinned'])}." if res["unpinned"] else ""),
        f"- Each variant changes one axis of the baseline. Selection score (\"valid\"): the validation mean "
        f"over tasks of {METRIC} at the kept checkpoint (training's validation, the logged/sampled candidates; "
        "`metrics.json` `best`), mean over seeds. Test never selects.",
        "- Cost: median training wall seconds per run (validation included, test excluded), parameters, and "
        "the wall time relative to the baseline.",
    ]  # fmt: skip
    lines += ["", f"## Results: test {protocol} {METRIC}", ""]
    head = ["axis", "variant", *tasks, "mean over tasks", "Δ mean vs baseline", "valid (selection)",
            "Δ valid", "wall s", "wall × baseline", "parameters"]  # fmt: skip
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    winners = {w["name"] for w in res["winners"].values()}
    bm, bv, bw = _mean(per_seed(base)), _valid_mean(base), _median_wall(base)
    for e in entries:
        name = f"**{e['name']}**" if e["name"] == rec["name"] else e["name"]
        name += " (axis winner)" if e["name"] in winners and e["axis"] != "baseline" else ""
        m, v, w = _mean(per_seed(e)), _valid_mean(e), _median_wall(e)
        same = e is base
        lines.append(
            f"| {e['axis']} | {name} | " + " | ".join(fmt(per_seed(e, t)) for t in tasks)
            + f" | {fmt(per_seed(e))} | {'' if same else _delta(m, bm)} | {fmt([r['valid'] for r in e['runs']])} | "
            f"{'' if same else _delta(v, bv)} | {w:.1f} | {w / bw:.2f} | {e['runs'][0]['parameters']:,} |"
        )  # fmt: skip
    pop = [r["popularity"] for r in base["runs"] if r["popularity"]]
    if pop:
        lines.append("| reference | popularity | " + " | ".join(fmt([p[t] for p in pop]) for t in tasks)
                     + f" | {fmt([_mean([p[t] for t in tasks]) for p in pop])} | | | | | | |")  # fmt: skip
    lines += [
        "",
        "Bold: the recommended default. Popularity: train engagement counts, on the baseline's data.",
        "",
    ]
    lines += ["## Deltas vs baseline, per task (test, mean over seeds)", ""]
    lines += ["| variant | " + " | ".join(tasks) + " | mean over tasks | tasks ≥ baseline |",
              "|" + "---|" * (len(tasks) + 3)]  # fmt: skip
    for e in entries[1:]:
        ds = [_mean(per_seed(e, t)) - _mean(per_seed(base, t)) for t in tasks]
        lines.append(f"| {e['name']} | " + " | ".join(_delta(_mean(per_seed(e, t)), _mean(per_seed(base, t))) for t in tasks)
                     + f" | {_delta(_mean(per_seed(e)), bm)} | {sum(d >= 0 for d in ds)}/{len(tasks)} |")  # fmt: skip
    extra = [
        k for k in (*EXTRA_METRICS, "auc") if all(k in s for r in base["runs"] for s in r["test"].values())
    ]
    if extra:
        lines += ["", "## Other test metrics (mean over tasks)", ""]
        lines += ["| variant | " + " | ".join(extra) + " |", "|" + "---|" * (len(extra) + 1)]
        for e in entries:
            lines.append(f"| {e['name']} | " + " | ".join(fmt(per_seed(e, None, k)) for k in extra) + " |")
    lines += ["", "## Stage 2: the axis winners and their combination", ""]
    for axis, w in res["winners"].items():
        lines.append(
            f"- {axis}: **{w['name']}** (valid {w['valid']:.4f}"
            + ("" if w["name"] == "baseline" else f", baseline {w['baseline_valid']:.4f}") + ")."
        )  # fmt: skip
    combo = res["combination"]
    ch = " ".join(f"{k}={v}" for k, v in combo["changes"].items()) or "(no change)"
    lines.append(
        f"- Combination `{ch}`: "
        + ("trained with every seed (row `combination`)." if combo["trained"]
           else f"the same configuration as `{combo['same_as']}`, so not trained again.")
    )  # fmt: skip
    lines += ["", "## Recommended default", ""]
    lines += recommendation_text(res)
    lines += ["", "## Command", "", "```bash", res["command"], "```", ""]
    path.write_text("\n".join(lines))


def recommendation_text(res: Dict) -> List[str]:
    """The recommendation and its reasoning, every sentence read off the figures."""
    rec, entries = res["recommended"], res["entries"]
    base = entries[0]
    best = next(e for e in entries if e["name"] == rec["name"])
    others = sorted((e for e in entries if e is not best), key=_valid_mean, reverse=True)
    n_seeds = len(base["runs"])
    out = []
    if best is base:
        out.append(
            f"**baseline**: keep the core default, no override. No variant beats its validation mean {METRIC} "
            f"({rec['baseline_valid']:.4f}; ties go to the baseline)"
            + (f"; the closest is {others[0]['name']} ({_valid_mean(others[0]):.4f})." if others else ".")
        )
    else:
        gap = rec["valid"] - rec["baseline_valid"]
        spread = max(_std([r["valid"] for r in best["runs"]]), _std([r["valid"] for r in base["runs"]]))
        if n_seeds > 1:
            where = "beyond" if gap > spread else "within"
            margin = f"; the seed std is up to {spread:.4f}, so the margin is {where} the seed spread"
        else:
            margin = "; one seed, so no spread to judge the margin by"
        out.append(
            f"**{rec['name']}**: `{rec['overrides']}`. It has the best validation mean {METRIC} of the "
            f"{len(entries)} configurations: {rec['valid']:.4f} against the baseline's "
            f"{rec['baseline_valid']:.4f} ({gap:+.4f}{margin}). Runner-up on validation: {others[0]['name']} "
            f"({_valid_mean(others[0]):.4f})."
        )
    test_best = max(entries, key=lambda e: _mean(per_seed(e)))
    if test_best is not best:
        out.append(
            f"On test alone {test_best['name']} has the best mean over tasks ({_mean(per_seed(test_best)):.4f} "
            f"against {_mean(per_seed(best)):.4f}); the recommendation follows validation, as selection must."
        )
    if best is base:
        return out
    out += [
        "",
        f"Test {METRIC} of the recommendation against the baseline, per task (mean over seeds):",
        "",
        "| task | recommended | baseline | Δ | ≥ baseline | paired seeds ≥ |",
        "|---|---|---|---|---|---|",
    ]
    for t in rec["tasks"]:
        out.append(
            f"| {t['task']} | {t['recommended']:.4f} | {t['baseline']:.4f} | "
            f"{_delta(t['recommended'], t['baseline'])} | {'yes' if t['at_least_baseline'] else '**no**'} | "
            f"{t['paired_seeds_at_least']}/{t['seeds']} |"
        )
    rm, bm = _mean(per_seed(best)), _mean(per_seed(base))
    out += ["", f"- Mean over tasks on test: {rm:.4f} against {bm:.4f}, Δ {_delta(rm, bm)}."]
    lost = [t for t in rec["tasks"] if not t["at_least_baseline"]]
    if not lost:
        out.append("- It is ≥ the baseline on every task (mean over seeds): no trade-off on test.")
    else:
        by = [
            f"{t['task']} by {t['baseline'] - t['recommended']:.4f}"
            + (f" ({(t['baseline'] - t['recommended']) / t['baseline'] * 100:.1f}%)" if t["baseline"] else "")
            for t in lost
        ]
        out.append(
            f"- **Trade-off:** it is below the baseline on {len(lost)} of {len(rec['tasks'])} tasks: "
            + "; ".join(by)
            + " (test, mean over seeds)."
        )
    out.append(
        f"- Cost: {_median_wall(best) / _median_wall(base):.2f}x the baseline's training wall time, "
        f"{best['runs'][0]['parameters'] / base['runs'][0]['parameters']:.2f}x its parameters."
    )
    out += [
        "",
        "To make it the default, these overrides (or the same values in `unirec/config.py`):",
        "",
        "```",
        rec["overrides"],
        "```",
    ]
    return out


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
    ap.add_argument("--size", choices=sorted(cr.SIZES), help=f"model size of every run (default {SIZE})")
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
    ap.add_argument("--quick", action="store_true", help="tiny synthetic data, 1 epoch, 1 seed (the test)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    try:
        variants = select_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    if "ml100k" in args.suites and not args.raw_dir and not args.render:
        ap.error("suite ml100k needs --raw-dir (python scripts/fetch_movielens.py data/ml-100k)")
    if args.fresh and not args.render and Path(args.work).exists():
        shutil.rmtree(args.work)
    t0 = time.perf_counter()
    all_suites = suites(args)
    done: List[Tuple[str, Dict]] = []
    # every suite's variants are checked before any training, so a missing option fails at once
    ready = {} if args.render else {n: setup_suite(all_suites[n], variants, args) for n in args.suites}
    for name in args.suites:
        out = Path(args.out) / OUT_DIRS[name]
        if args.render:
            res = json.loads((out / "ablations.json").read_text())
        else:
            res = run_suite(all_suites[name], variants, *ready[name], args)
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


CHOSEN = "## Chosen default"


def chosen_default_section(path: Path) -> str:
    """The hand-written "Chosen default" section of an existing report (to its end), or ""."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(CHOSEN)
    return text[at:] if at >= 0 else ""


if __name__ == "__main__":
    main()
