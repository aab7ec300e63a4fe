"""``python -m unirec.advise``: before training a grid, which tasks gain from sharing one model.

Takes the same Hydra overrides as ``python -m unirec.train``. It trains the unified model for the first
``advise.fraction`` of ``trainer.max_steps`` (the full run's own schedule, loader and step), and every
``advise.measure_every`` steps measures, before that step and on its batch (the losses read on that batch,
or with ``advise.probe_rows`` on a fixed probe of validation rows), for every pair of tasks:

- the lookahead affinity Z_{i→j} of TAG (Fifty et al., NeurIPS 2021) at the shared parameters (everything
  but the task heads), see :mod:`unirec.affinity`, under the run's own objective (a softmax task's
  in-batch negatives included) and with the step the run's Adam would take (``advise.lookahead``);
- the cosine of the two tasks' gradients there;
- with ``advise.min_alignment`` set (off by default), each task's gradient at the embedding table of its
  candidates, summed over the measured steps, for the tasks' :func:`unirec.affinity.alignment` there;

and once, from the prepared data, the overlap of their context fields, candidate types and candidate sets.

Examples::

    python -m unirec.advise                                   # the default tasks on the synthetic canvases
    python -m unirec.advise debug=toy                         # seconds on a CPU
    python -m unirec.advise data.synthetic.relatedness=0.0 task=[home,related,search,genre]

Writes ``advice.json``, ``advice.md`` and ``advice.png`` (heatmaps) to ``advise.out_dir`` or the Hydra run
directory: per task, the predicted benefit of one model for all tasks with its standard error, the
recommended grouping (exhaustive search, :func:`unirec.affinity.best_grouping`) and the evidence for it.
One process, no DDP: the short run is cheap on one device.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import hydra
import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from unirec.advice_report import write_heatmap, write_markdown
from unirec.affinity import (
    AffinityLog,
    Direction,
    Lookahead,
    alignment,
    benefit,
    best_grouping,
    lookahead,
    normalised,
    onto,
)
from unirec.config import Config, conf_dir, register_configs, to_object
from unirec.data.batch import CANDIDATE, Batch, concat_arrays, table_to_arrays, to_batch
from unirec.data.loader import shard_files
from unirec.data.prepare import prepare
from unirec.losses import Objective, task_mean
from unirec.model import MultiTaskRanker
from unirec.schema import FeatureSpec
from unirec.train import Training, check, setup, train_step

log = logging.getLogger("unirec.advise")


def shared_parameters(module: MultiTaskRanker) -> Dict[str, torch.nn.Parameter]:
    """Every parameter outside the per-task heads: what one model shares and bespoke models would not.

    Rows of a table that one task alone reads (its task_type embedding) are included; only that task's
    gradient moves them, so they add nothing to another task's affinity."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("heads.")}


@dataclass
class Probe:
    """Validation rows the affinity is measured on (``advise.probe_rows``), with their fixed pools."""

    batch: Batch
    head: torch.Tensor
    pools: list


def make_probe(
    features: Path,
    spec: FeatureSpec,
    module: MultiTaskRanker,
    objective: Objective,
    rows: int,
    seed: int,
    device,
) -> Probe:
    """``rows`` validation rows per task, drawn once with ``seed``: at random for a BCE task; for a sampled
    (softmax, BPR) task, up to ``rows // 2`` positives and other rows to fill, whose candidates become the
    positives' negatives (a validation split holds one positive per request among many negatives)."""
    rng = np.random.default_rng([seed, 7])
    parts = []
    for k, t in enumerate(module.task_names):
        table = pq.read_table(shard_files(features, "valid", t))
        if table.num_rows == 0:
            raise ValueError(
                f"advise.probe_rows: task {t!r} has no validation rows under {features}; set advise.probe_rows=0"
            )
        if k in objective.sampled:
            label = table["label"].to_numpy()
            pos, other = np.flatnonzero(label > 0), np.flatnonzero(label <= 0)
            if len(pos) == 0:
                raise ValueError(
                    f"advise.probe_rows: task {t!r} has no positive validation row under {features}; "
                    "set advise.probe_rows=0"
                )
            pos = rng.choice(pos, min(len(pos), rows // 2), replace=False)
            take = np.concatenate([pos, rng.choice(other, min(len(other), rows - len(pos)), replace=False)])
        else:
            take = rng.choice(table.num_rows, min(rows, table.num_rows), replace=False)
        parts.append(table_to_arrays(table.take(np.sort(take))))
    batch = to_batch(concat_arrays(parts), spec).to(device)
    head = module.head_index(batch.task_type)
    return Probe(batch, head, objective.pools(batch, head, torch.Generator().manual_seed(seed)))


def _losses_at(module: MultiTaskRanker, objective: Objective, batch: Batch, head, pools):
    """The :data:`unirec.affinity.LossesAt` of one batch under the run's objective (NaN for a task without
    rows that carry a loss there)."""
    k = len(module.task_names)

    def losses_at(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        call = (lambda *a: torch.func.functional_call(module, dict(params), a)) if params else module
        logits, pairs, full = objective.forward_logits(call, batch, pools)
        per_row, weight = objective.row_losses(batch, head, logits, pools, pairs, full)
        losses, rows = task_mean(per_row, weight, head, k)
        return losses.where(rows > 0, math.nan)  # a task without rows here: NaN, not a loss of 0

    return losses_at


def ranker_lookahead(
    module: MultiTaskRanker,
    objective: Objective,
    batch: Batch,
    lr: float,
    direction: Optional[Direction] = None,
    step: int = 0,
    probe: Optional[Probe] = None,
    keep: Sequence[str] = (),
) -> Lookahead:
    """:func:`unirec.affinity.lookahead` of the ranker on one batch (on its device), under the run's own
    training objective (a softmax task's in-batch negatives are drawn once, seeded by ``step``, and reused
    for every lookahead), in eval mode and fp32 so that the loss before and after a lookahead differ only
    by the step. With a ``probe``, the losses before and after are the probe's (held out). ``keep``: shared
    parameters whose per-task gradients come back (:attr:`unirec.affinity.Lookahead.grads`)."""
    k = len(module.task_names)
    head = module.head_index(batch.task_type)
    pools = objective.pools(batch, head, torch.Generator().manual_seed(step)) if objective.sampled else []
    present = torch.zeros(k, dtype=torch.bool, device=head.device).index_fill(0, head.unique(), True)
    present[[i for i in objective.sampled if i not in {j for j, _, _ in pools}]] = False  # no positive row
    losses_at = _losses_at(module, objective, batch, head, pools)
    held_out = None if probe is None else _losses_at(module, objective, probe.batch, probe.head, probe.pools)
    was_training = module.training
    module.eval()
    try:
        return lookahead(losses_at, shared_parameters(module), lr, present, direction, held_out, keep)
    finally:
        module.train(was_training)


def adam_direction(opts: Sequence[torch.optim.Optimizer], shared: Mapping[str, torch.Tensor]) -> Direction:
    """The step direction Adam would take next if its gradient were a task's gradient g alone, from the
    run's (Sparse)Adam(W) state: ``g / (sqrt(v_hat) + eps)`` with ``v = beta2 * v + (1 - beta2) * g**2``
    and ``v_hat`` its bias correction at the next step (at a parameter without state, Adam's first step:
    ``g / (|g| + eps)``). Momentum and weight decay are left out: the lookahead is one task's own step.

    Adam scales every coordinate by its gradient history, so an embedding row that few batches touch
    moves as far as a dense weight; a plain gradient step would measure the affinity mostly through the
    few largest-gradient parameters, which is not how the run moves.
    """
    by_id = {}
    for o in opts:
        for group in o.param_groups:
            for p in group["params"]:
                by_id[id(p)] = (o, p, group["betas"][1], group["eps"])
    names = {n: by_id.get(id(p)) for n, p in shared.items()}

    def direction(name: str, g: torch.Tensor) -> torch.Tensor:
        found = names.get(name)
        if found is None:
            raise KeyError(f"shared parameter {name} is in no optimizer")
        o, p, beta2, eps = found
        state = o.state.get(p, {})  # read now: the optimizer creates and replaces it as the run steps
        v, t = state.get("exp_avg_sq"), float(state.get("step", 0))
        v = (1 - beta2) * g.square() if v is None else beta2 * v + (1 - beta2) * g.square()
        return g / ((v / (1 - beta2 ** (t + 1))).sqrt() + eps)

    return direction


def advise_steps(cfg: Config) -> int:
    """Steps of the short run: ``ceil(advise.fraction * trainer.max_steps)``."""
    return max(1, math.ceil(cfg.advise.fraction * cfg.trainer.max_steps))


def skip_steps(cfg: Config) -> int:
    """Steps before the first measurement: ``advise.skip_steps``, or (null) ``optim.warmup_steps`` but at
    most half of :func:`advise_steps`."""
    if cfg.advise.skip_steps is None:
        return min(cfg.optim.warmup_steps, advise_steps(cfg) // 2)
    return cfg.advise.skip_steps


def check_advise(cfg: Config) -> None:
    """Fail before any work, naming the key, on settings the advisor cannot use."""
    check(cfg)
    if skip_steps(cfg) >= advise_steps(cfg):
        raise ValueError(
            f"the advisor trains {advise_steps(cfg)} steps (advise.fraction={cfg.advise.fraction} of "
            f"trainer.max_steps={cfg.trainer.max_steps}) and measures none of them after skipping "
            f"{skip_steps(cfg)} (advise.skip_steps): raise advise.fraction or "
            "lower advise.skip_steps"
        )
    if len(cfg.task) < 2:
        raise ValueError(
            f"the advisor compares tasks: select at least two with task=[...], got {sorted(cfg.task)}"
        )
    if len(cfg.task) > cfg.advise.max_group_tasks:
        raise ValueError(
            f"{len(cfg.task)} tasks selected but the exhaustive grouping search takes at most "
            f"advise.max_group_tasks={cfg.advise.max_group_tasks}; select fewer with task=[...] or raise it"
        )
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("the advisor draws advice.png with matplotlib: pip install 'unirec[report]'")


def candidate_tables(spec: FeatureSpec) -> Dict[str, str]:
    """Task -> the shared parameter of the embedding table its candidates' ids read."""
    ids = {c: spec.candidate_fields[cs.id_field].table for c, cs in spec.candidates.items()}
    return {t: f"tables.{ids[ts.candidate]}.weight" for t, ts in spec.tasks.items() if ids[ts.candidate]}


def measure(cfg: Config, tr: Training, features: Path) -> AffinityLog:
    """The short joint run: train_step on every step; after :func:`skip_steps`, a lookahead measurement
    before every ``advise.measure_every``-th one, stepped on its batch (read there, or on the probe of
    ``advise.probe_rows`` validation rows per task, :func:`make_probe`). With ``advise.min_alignment`` set,
    the log also sums each task's gradient at every candidate table two or more tasks read
    (:func:`candidate_tables`)."""
    steps, every, skip = advise_steps(cfg), cfg.advise.measure_every, skip_steps(cfg)
    lr = cfg.advise.lookahead_lr or cfg.optim.lr
    direction = (
        adam_direction(tr.opts, shared_parameters(tr.module)) if cfg.advise.lookahead == "adam" else None
    )
    acc = AffinityLog(len(tr.module.task_names))
    used = list(candidate_tables(tr.spec).values())
    keep = sorted({t for t in used if used.count(t) > 1}) if cfg.advise.min_alignment is not None else []
    probe = None
    if cfg.advise.probe_rows:
        probe = make_probe(
            features, tr.spec, tr.module, tr.objective, cfg.advise.probe_rows, cfg.seed, tr.device
        )
    batches = tr.loader.batches(pin_memory=tr.device.type == "cuda")
    try:
        for step in range(steps):
            batch, _ = next(batches)
            batch = batch.to(tr.device, non_blocking=True)
            if step >= skip and (step - skip) % every == 0:
                acc.add(ranker_lookahead(tr.module, tr.objective, batch, lr, direction, step, probe, keep))
            train_step(tr, batch)
    finally:
        batches.close()  # stops the prefetch thread
    return acc


def overlaps(spec: FeatureSpec, features: Path) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Kind -> task -> task -> overlap in [0, 1] of what two tasks see.

    context: Jaccard of their context field sets. candidate_type: 1 when they rank the same entity type.
    candidate_set: Jaccard of the candidate ids in their train rows (0 across types)."""
    names = list(spec.tasks)
    fields = {t: set(spec.tasks[t].fields) for t in names}
    ctype = {t: spec.tasks[t].candidate for t in names}
    ids = {}
    for t in names:
        col = CANDIDATE + spec.candidates[ctype[t]].id_field
        table = pq.read_table(shard_files(features, "train", t), columns=[col])
        ids[t] = set(np.unique(table[col].to_numpy()).tolist())

    def jaccard(a: set, b: set) -> float:
        return len(a & b) / len(a | b) if a | b else 0.0

    return {
        "context": {i: {j: jaccard(fields[i], fields[j]) for j in names} for i in names},
        "candidate_type": {i: {j: float(ctype[i] == ctype[j]) for j in names} for i in names},
        "candidate_set": {
            i: {j: jaccard(ids[i], ids[j]) if ctype[i] == ctype[j] else 0.0 for j in names} for i in names
        },
    }


def _matrix(x: torch.Tensor, names: List[str]) -> Dict[str, Dict[str, Optional[float]]]:
    """[K, K] -> i -> j -> value (None for NaN, so the JSON stays standard)."""
    return {
        i: {j: (None if math.isnan(v) else v) for j, v in zip(names, row)}
        for i, row in zip(names, x.tolist())
    }


def verdict(b: float, se: float) -> str:
    """gains / loses when the predicted benefit is two standard errors clear of 0, else unclear."""
    if math.isnan(b):
        return "unmeasured"
    if math.isnan(se):
        return "gains" if b > 0 else "loses"
    return "gains" if b - 2 * se > 0 else "loses" if b + 2 * se < 0 else "unclear"


def task_alignment(
    names: List[str], acc: AffinityLog, tables: Mapping[str, str]
) -> Tuple[Dict[str, Dict], Dict[str, Optional[float]]]:
    """The :func:`unirec.affinity.alignment` matrix of every candidate table the log kept gradients for
    (table -> i -> j -> value), and each task's mean alignment with the other tasks whose candidates read
    its table (None where no other task does, or none was measured)."""
    mats = {tab: alignment(acc.grads[tab]) for tab in sorted(set(tables.values())) if tab in acc.grads}
    per_task: Dict[str, Optional[float]] = {}
    for k, t in enumerate(names):
        m = mats.get(tables.get(t))
        mates = [j for j, u in enumerate(names) if u != t and tables.get(u) == tables.get(t)]
        vals = [] if m is None else [v for j in mates if not math.isnan(v := float(m[k, j]))]
        per_task[t] = sum(vals) / len(vals) if vals else None
    return {tab: _matrix(m.float(), names) for tab, m in mats.items()}, per_task


def build_advice(
    names: List[str],
    acc: AffinityLog,
    ov: Dict,
    max_tasks: int,
    tables: Optional[Mapping[str, str]] = None,
    min_alignment: Optional[float] = None,
) -> Dict:
    """The advice as plain data (see :func:`recommendation` for each task's entry). ``tables``: task ->
    its candidate table's parameter (:func:`candidate_tables`), for the alignment rule of
    ``min_alignment``. The sign (``helps``): without the rule (None), the predicted benefit's; with it, a
    task whose alignment is below it is predicted to lose and is taken out of its group, and every other
    task is predicted to gain unless its verdict is ``loses`` (its benefit two standard errors below 0)."""
    z = acc.mean_affinity()
    a = normalised(z)
    b, se = benefit(acc.steps, z)
    am = _matrix(a, names)
    an = {i: {j: (0.0 if v is None else v) for j, v in r.items()} for i, r in am.items()}  # unknown: 0
    mats, align = task_alignment(names, acc, tables or {}) if tables else ({}, {t: None for t in names})
    misaligned = {
        t for t in names if min_alignment is not None and align[t] is not None and align[t] < min_alignment
    }
    kept = [t for t in names if t not in misaligned]  # the search runs over the others only
    grouping = best_grouping({i: {j: an[i][j] for j in kept} for i in kept}, max_tasks)
    groups = grouping.groups + [[t] for t in names if t in misaligned]
    into = onto(groups, an)
    cos = _matrix(acc.mean_cosine(), names)
    tasks = {}
    for k, t in enumerate(names):
        group = next(g for g in groups if t in g)
        tasks[t] = recommendation(t, group, float(b[k]), float(se[k]), into[t], am, cos, ov)
        tasks[t]["alignment"] = align[t]
        if min_alignment is None:
            tasks[t]["helps"] = float(b[k]) > 0
        else:
            tasks[t]["helps"] = tasks[t]["verdict"] != "loses" and t not in misaligned
        if align[t] is not None:
            tasks[t]["evidence"].append(
                f"gradient alignment with the other tasks at its candidates' table {align[t]:.3f} (linear CKA "
                "of the summed gradients)"
                + (f", below advise.min_alignment={min_alignment:g}: predicted to lose, kept bespoke"
                   if t in misaligned else "")
            )  # fmt: skip
        if t in misaligned:
            tasks[t]["recommendation"] = (
                "keep bespoke: its use of the shared candidate table is unrelated to the other tasks'"
            )
    one = best_grouping_score(am, [names])
    return {
        "tasks": names,
        "affinity": _matrix(z, names),
        "normalised_affinity": am,
        "cosine": cos,
        "overlap": ov,
        "measured_steps": len(acc.steps),
        "alignment": mats,
        "min_alignment": min_alignment,
        "grouping": {
            "groups": groups,
            "score": best_grouping_score(am, groups),
            "searched": grouping.searched,
            "one_model_score": one,
            "bespoke_score": 0.0,
        },  # fmt: skip
        "advice": tasks,
    }


def headroom(value: Optional[float]) -> float:
    """(1 - v) / v of a metric in (0, 1]: how far a task is from a perfect score, relative to where it is.
    NaN where the metric is missing or not in (0, 1]."""
    if value is None or not 0 < value <= 1:
        return math.nan
    return (1 - value) / value


def add_predicted_lift(adv: Dict, valid: Mapping[str, Mapping[str, float]], metric: str) -> None:
    """Each task's predicted relative lift of one model for all tasks: the predicted benefit (a relative
    gain in the task's loss, first order) times the task's :func:`headroom` in ``metric`` on validation at
    the end of the short run. A task near the top of its metric has little to gain however related the
    others are; one far from it gains relatively more from the same benefit. The sign is the benefit's,
    so the verdict is unchanged; the lift orders the tasks by how much they stand to gain."""
    adv["headroom_metric"] = metric
    for t, a in adv["advice"].items():
        value = valid.get(t, {}).get(metric)
        room = headroom(value)
        lift = a["benefit"] * room
        a[f"short_run_{metric}"] = value
        a["headroom"] = None if math.isnan(room) else room  # None, not NaN: standard JSON
        a["predicted_lift"] = None if math.isnan(lift) else lift
        if a["predicted_lift"] is not None:
            a["evidence"].append(
                f"short-run validation {metric} {value:.4f}: headroom {a['headroom']:.2f}, predicted relative "
                f"lift {a['predicted_lift']:+.3f}"
            )


def best_grouping_score(am: Mapping[str, Mapping[str, Optional[float]]], groups: List[List[str]]) -> float:
    """Total normalised affinity onto each task from its group, for a given grouping (unknown pairs: 0)."""
    return sum(am[i][j] or 0.0 for g in groups for j in g for i in g if i != j)


def recommendation(
    t: str, group: List[str], b: float, se: float, onto: float, am: Dict, cos: Dict, ov: Dict
) -> Dict:
    """One task's entry: where it goes, why, and how sure the measurement is."""
    others = [i for i in am if i != t and am[i][t] is not None]
    helps = max(others, key=lambda i: am[i][t], default=None)
    hurts = min(others, key=lambda i: am[i][t], default=None)
    mates = [i for i in group if i != t]
    v = verdict(b, se)
    if mates:
        rec = f"share one model with {', '.join(mates)}"
    else:
        rec = "keep bespoke: no group lifts it above what it gets alone"
    evidence = [
        f"predicted benefit of one model for all tasks {b:+.3f} ± {se:.3f} (standard error over measured "
        f"steps): {v}",
        f"affinity onto {t} from its recommended group {onto:+.3f}",
    ]
    if helps is not None:
        evidence.append(f"helped most by {helps} ({am[helps][t]:+.3f}, gradient cosine {cos[helps][t]:+.2f}); "
                        f"hurt most by {hurts} ({am[hurts][t]:+.3f}, gradient cosine {cos[hurts][t]:+.2f})")  # fmt: skip
    for m in mates:
        evidence.append(f"with {m}: context fields overlap {ov['context'][t][m]:.2f}, same candidate type "
                        f"{'yes' if ov['candidate_type'][t][m] else 'no'}, candidate set overlap {ov['candidate_set'][t][m]:.2f}")  # fmt: skip
    return {"group": group, "recommendation": rec, "benefit": b, "stderr": se, "verdict": v,
            "onto_from_group": onto, "helped_most_by": helps, "hurt_most_by": hurts, "evidence": evidence}  # fmt: skip


def run(cfg: Config, out_dir: Path, features: Optional[Path] = None) -> Dict:
    """Prepare (or find) the data, run the short joint run, write and return the advice."""
    check_advise(cfg)
    t0 = time.perf_counter()
    features = features or prepare(cfg.data, cfg.task, cfg.seed)
    t1 = time.perf_counter()
    tr = setup(cfg, features)
    acc = measure(cfg, tr, features)
    names = tr.module.task_names
    ov = overlaps(tr.spec, features)
    adv = build_advice(
        names, acc, ov, cfg.advise.max_group_tasks, candidate_tables(tr.spec), cfg.advise.min_alignment
    )
    metric = cfg.trainer.best_metric.partition("/")[2]
    add_predicted_lift(adv, tr.validation.model(tr.module, tr.device), metric)
    t2 = time.perf_counter()
    adv.update(
        steps=advise_steps(cfg),
        skipped_steps=skip_steps(cfg),
        full_run_steps=cfg.trainer.max_steps,
        fraction=cfg.advise.fraction,
        lookahead_lr=cfg.advise.lookahead_lr or cfg.optim.lr,
        probe_rows=cfg.advise.probe_rows,
        seconds={"prepare": round(t1 - t0, 2), "advise": round(t2 - t1, 2), "total": round(t2 - t0, 2)},
        features=str(features),
        command=" ".join(["python -m unirec.advise", *sys.argv[1:]]),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "advice.json").write_text(json.dumps(adv, indent=2, sort_keys=True))
    write_heatmap(adv, out_dir / "advice.png")
    write_markdown(adv, out_dir / "advice.md")
    log.info("advice in %s", out_dir)
    return adv


register_configs()


@hydra.main(config_path=conf_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> Dict:
    from hydra.core.hydra_config import HydraConfig

    config = to_object(cfg)
    out = Path(config.advise.out_dir or HydraConfig.get().runtime.output_dir)
    adv = run(config, out)
    for t in adv["tasks"]:
        a = adv["advice"][t]
        lift = "n/a" if a["predicted_lift"] is None else f"{a['predicted_lift']:+.3f}"
        sign = "predicted to gain" if a["helps"] else "predicted to lose"
        print(f"{t}: {sign}, {a['verdict']} ({a['benefit']:+.3f} ± {a['stderr']:.3f}; predicted relative lift {lift}); "
              f"{a['recommendation']}")  # fmt: skip
    print(f"advice: {out / 'advice.md'}")
    return adv


if __name__ == "__main__":
    main()
