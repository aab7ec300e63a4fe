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
from typing import Dict, Mapping, Optional, Sequence

import hydra
import numpy as np
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from unirec.advice import add_predicted_lift, build_advice
from unirec.advice_report import write_heatmap, write_markdown
from unirec.affinity import AffinityLog, Direction, Lookahead, lookahead
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
