"""The consolidation suites (MovieLens-100K and the synthetic canvases at any relatedness) and the config
of one run of a suite: its tasks, learning rate, model size and seed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SIZES = {
    "S": {"embedding_dim": 16, "hidden_dim": 32},
    "M": {"embedding_dim": 32, "hidden_dim": 64},
    "W": {"embedding_dim": 64, "hidden_dim": 32},
}
"""Model sizes of the sweep (the core default is embedding 16, hidden 64); W, wide embeddings on a narrow
tower, is the MovieLens recipe (conf/experiment/ml100k.yaml)."""
TUNED = "tuned"
"""The size of a run whose widths come from a hyperparameter search (``--tuned``): no size overrides, the
search's own (its best point's ``model.*`` among the run's extra overrides)."""
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


def compose(
    suite: Suite, tasks: Optional[Sequence[str]], lr: float, size: str, seed: int, extra: Sequence[str] = ()
):
    """The run's config; ``tasks=None`` keeps the task list of ``suite.overrides`` (or conf/train.yaml);
    ``size=TUNED`` sets no widths (the tuned point's overrides, in ``extra``, do)."""
    from unirec.config import compose as compose_cfg

    model = [] if size == TUNED else [f"model.{k}={v}" for k, v in SIZES[size].items()]
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
