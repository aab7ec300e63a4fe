"""``python -m unirec.train``: compose the config, prepare the data, run the step loop, report per task.

Examples::

    python -m unirec.train                                   # synthetic canvases, all four tasks
    python -m unirec.train task=[home,search] model.embedding_dim=32 trainer.max_steps=100
    python -m unirec.train -m optim.lr=1e-3,3e-3             # a sweep (Hydra multirun)
    torchrun --nproc_per_node=2 -m unirec.train hydra.run.dir=runs/ddp   # DDP (gloo on CPU, NCCL on GPU)

The run directory (``runs/<date>/<time>`` by default) receives TensorBoard events, checkpoints, the
composed config, ``train_log.jsonl`` (the loss of every logged step, as text) and ``metrics.json``.
A restarted job with the same ``hydra.run.dir`` resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from unirec import checkpoint
from unirec import distributed as dst
from unirec.balancing import LossBalancer, build_balancer, check_loss_config, task_grad_norms
from unirec.config import Config, TrainerConfig, ValidProtocol, conf_dir, register_configs, to_object
from unirec.data.batch import Batch
from unirec.data.loader import MixedLoader
from unirec.data.prepare import prepare
from unirec.losses import Objective, build_objective, task_mean
from unirec.memory import keep_freed_memory
from unirec.model import MultiTaskRanker
from unirec.optim import build_optimizers, build_schedulers
from unirec.progress import progress_bar
from unirec.report import Scores, TaskLossLog, format_table, log_scalars, metric_value, write_hparams
from unirec.schema import FeatureSpec
from unirec.validation import FULL_METRICS, Validation

log = logging.getLogger("unirec.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


def setup_device(cfg: TrainerConfig, local_rank: int = 0) -> Tuple[torch.device, bool]:
    """The device, and whether to autocast to bf16 (CUDA only unless asked)."""
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per torchrun process
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu"
            )
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return device, bf16


@dataclass(frozen=True)
class Schedule:
    """The loop's length and intervals in steps, from ``trainer`` (and the train rows, with epochs)."""

    max_steps: int
    eval_every: int
    checkpoint_every: int
    steps_per_epoch: Optional[int] = None
    """Set when the run is measured in epochs."""


def schedule(tc: TrainerConfig, train_rows: int, global_batch: int) -> Schedule:
    """``trainer.epochs`` (if set) as steps: an epoch is ceil(train rows / global batch) steps.

    Example:
        >>> schedule(TrainerConfig(epochs=3, eval_every_epochs=2), 1000, 300)
        Schedule(max_steps=12, eval_every=8, checkpoint_every=8, steps_per_epoch=4)
    """
    if tc.epochs is None:
        return Schedule(tc.max_steps, tc.eval_every, tc.checkpoint_every)
    epoch = max(1, math.ceil(train_rows / global_batch))
    every = epoch * tc.eval_every_epochs
    return Schedule(epoch * tc.epochs, every, every, epoch)


@dataclass
class Training:
    """Everything the step loop needs, built from the config by :func:`setup`."""

    spec: FeatureSpec
    module: MultiTaskRanker
    """The model itself (``model`` may be its DDP or compiled wrapper)."""
    model: torch.nn.Module
    opts: List[torch.optim.Optimizer]
    scheds: list
    loader: MixedLoader
    loss_weights: torch.Tensor
    balancer: LossBalancer
    """Combines the task losses (``loss.balancing``); trained beside the model, never exported with it."""
    objective: Objective
    """Each task's loss (``task.<name>.loss``)."""
    plan: Schedule
    device: torch.device
    bf16: bool
    dist: dst.Dist
    validation: Validation
    """Scores the model and popularity on the valid split (``trainer.valid_protocol``)."""


def setup(cfg: Config, features: Path, d: Optional[dst.Dist] = None) -> Training:
    """Model, optimizers, schedules and loader for ``cfg`` on the prepared ``features``."""
    d = d or dst.Dist()
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    torch.manual_seed(cfg.seed)
    spec = FeatureSpec.load(features / "feature_spec.json")
    device, bf16 = setup_device(cfg.trainer, d.local_rank)
    module = MultiTaskRanker(spec, cfg.model, sparse=cfg.optim.sparse_embeddings)
    if module.transitions is not None:  # counted from the train split once, then part of the weights
        from unirec.baselines import transition_table

        prior = module.transitions
        prior.counts.copy_(torch.from_numpy(transition_table(features, spec, prior.id_field, prior.window)))
    module = module.to(device)
    model: torch.nn.Module = module
    if d.world > 1:
        # Every head scores every row, so no parameter is ever unused: the cheap DDP path. The model's
        # buffers are constants every rank builds alike (the transition counts among them, [T, T]):
        # nothing to broadcast before each forward.
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if cfg.trainer.compile:
        model = torch.compile(model)
    weights = {t: c.sampling_weight for t, c in cfg.task.items()}
    borrow = {t: c.borrow for t, c in cfg.task.items()}
    loader = MixedLoader(features, spec, cfg.loader, weights, cfg.seed, d.rank, d.world, str(device), borrow)
    plan = schedule(cfg.trainer, sum(loader.rows.values()), cfg.loader.batch_size * d.world)
    opts = build_optimizers(module, cfg.optim)
    scheds = build_schedulers(opts, plan.max_steps, cfg.optim)
    loss_weights = torch.tensor([spec.tasks[t].loss_weight for t in module.task_names], device=device)
    balancer = build_balancer(cfg.loss, loss_weights, module.task_names)
    objective = build_objective(cfg, spec, module.task_names, features, device)
    tc = cfg.trainer
    validation = Validation(features, spec, tc.valid_protocol, tc.eval_batch_size, d)
    parts = (spec, module, model, opts, scheds, loader, loss_weights, balancer, objective, plan, device)
    return Training(*parts, bf16, d, validation)


def shared_weight(module: MultiTaskRanker) -> torch.Tensor:
    """The last Linear weight of the context encoder: every task's loss flows through it (gradient norms)."""
    return module.context_encoder[-1].weight


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class StepResult(NamedTuple):
    """What one step reports, for the global batch (all ranks)."""

    loss: torch.Tensor
    """The balanced total (scalar)."""
    losses: torch.Tensor
    """[K] per-task losses."""
    counts: torch.Tensor
    """[K] rows of each task."""
    stepped: bool
    """False when the step was skipped (a non-finite loss or gradient on some rank)."""
    grad_norms: Optional[torch.Tensor]
    """[K] ||dL_k/dW|| at :func:`shared_weight`, when computed (asked for, or the balancer needs it)."""


def train_step(tr: Training, batch: Batch, grad_norms: bool = False, step: int = 0) -> StepResult:
    """One optimisation step of the model and the loss balancer on a batch on the device.

    ``grad_norms`` asks for the tasks' gradient norms (K extra partial backward passes; gradnorm computes
    them on every step anyway). ``step`` seeds the draw of in-batch candidates (softmax and bpr tasks), so
    a resumed run draws the same ones. A step whose loss or gradient (the balancer's included) is not finite on any
    rank is skipped on every rank: weights, balancer, optimizer moments and the schedule stay as they were.
    """
    head = tr.module.head_index(batch.task_type)
    d, world = tr.dist, tr.dist.world
    pools = []
    if tr.objective.sampled:
        gen = torch.Generator().manual_seed(step * max(world, 1) + d.rank)
        pools = tr.objective.pools(batch, head, gen)
    with _autocast(tr.device, tr.bf16):
        logits, pairs, full = tr.objective.forward_logits(tr.model, batch, pools)
    per_row, weight = tr.objective.row_losses(batch, head, logits, pools, pairs, full)
    all_sum = (lambda x: dst.all_sum(d, x)) if world > 1 else None
    losses, counts = task_mean(per_row, weight, head, len(tr.module.task_names), all_sum, world)
    counts = dst.all_sum(d, counts)  # presence in the global batch, which the balancer needs
    norms = None
    if grad_norms or tr.balancer.needs_grad_norms:
        all_mean = (lambda x: dst.all_sum(d, x) / world) if world > 1 else None
        norms = task_grad_norms(losses, shared_weight(tr.module), all_mean)
    loss = tr.balancer.total(losses, counts)
    for o in tr.opts:
        o.zero_grad(set_to_none=True)
    tr.balancer.zero_grad()
    loss.backward()
    if world > 1:
        for p in tr.balancer.parameters():
            if p.grad is not None:  # each rank's loss is its share of the global loss: average
                p.grad = dst.all_sum(d, p.grad) / world
    checked = [loss, *(p.grad for p in tr.module.parameters() if p.grad is not None), *tr.balancer.grads()]
    finite = _all_finite(checked + ([norms] if tr.balancer.needs_grad_norms else []))
    stepped = dst.all_true(d, finite)
    # Report the loss of the global batch: each rank's term is its share, scaled by world.
    losses = dst.all_sum(d, losses.detach()) / world if world > 1 else losses.detach()
    reported = tr.balancer.total(losses, counts).detach()
    if stepped:
        for o, s in zip(tr.opts, tr.scheds):
            o.step()
            s.step()
        tr.balancer.update(losses, counts, norms)
    else:
        for o in tr.opts:
            o.zero_grad(set_to_none=True)
        tr.balancer.zero_grad()
    return StepResult(reported, losses, counts, stepped, norms)


def _all_finite(tensors: List[torch.Tensor]) -> torch.Tensor:
    """One bool tensor: every value of every (dense or sparse) tensor is finite; no sync with the host."""
    return torch.stack(
        [torch.isfinite(t.coalesce()._values() if t.is_sparse else t).all() for t in tensors]
    ).all()


@dataclass
class Progress:
    """Loop counters saved with every checkpoint."""

    step: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    best: Optional[float] = None
    best_step: Optional[int] = None
    task_best: Dict[str, List] = field(default_factory=dict)
    """task -> [value, step] of its best validation by best_metric's metric."""
    since_best: int = 0
    """Validations in a row without a new best (trainer.patience)."""
    stopped_early: bool = False


def resume(tr: Training, run_dir: Path, cfg: TrainerConfig) -> Progress:
    """Restore model, optimizers, schedules, RNG and loader position when ``trainer.resume`` asks for it."""
    ckpt_dir = run_dir / "checkpoints"
    if tr.dist.main and checkpoint.clean_partial(ckpt_dir):
        log.warning("removed partial checkpoint(s) left by an interrupted write in %s", ckpt_dir)
    dst.barrier(tr.dist)
    if cfg.resume == "never":
        return Progress()
    if cfg.resume == "auto":  # the newest intact checkpoint: a broken newest one is warned about, skipped
        found = checkpoint.load_newest_intact(ckpt_dir, tr.module, log.warning)
        if found is None:
            return Progress()
        path, state, trainer = found
    else:
        path = Path(cfg.resume)
        state, trainer = checkpoint.load(path, tr.module)
    for o, s_ in zip(tr.opts, state["optimizers"]):
        o.load_state_dict(s_)
    for s, s_ in zip(tr.scheds, state["schedulers"]):
        s.load_state_dict(s_)
    torch.set_rng_state(state["torch_rng"])
    if tr.device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], tr.device)
    if len(trainer["loader"]) != tr.dist.world:
        raise checkpoint.CheckpointError(
            f"{path} was written by {len(trainer['loader'])} rank(s); resume it with the same number of processes"
        )
    tr.loader.load_state(trainer["loader"][tr.dist.rank])
    _resume_balancer(tr.balancer, state, path)
    log.info("resumed from %s (step %d)", path, trainer["step"])
    return Progress(**trainer["progress"])


def _resume_balancer(balancer: LossBalancer, state: dict, path: Path) -> None:
    """Restore the balancer; a checkpoint written before loss.balancing existed holds none (static then)."""
    if "balancer" in state:
        try:
            balancer.load_state_dict(state["balancer"])
        except ValueError as e:
            raise checkpoint.CheckpointError(f"cannot resume {path}: {e}") from e
    elif balancer.name != "static":
        log.warning("%s holds no loss balancer state (static); loss.balancing=%s starts from its initial "
                    "weights", path, balancer.name)  # fmt: skip


def _check_same_balancer(per_rank: List[List[float]], step: int) -> None:
    """Every rank must hold the same balancer weights (they are updated from all-reduced values)."""
    first = torch.tensor(per_rank[0])
    for rank, weights in enumerate(per_rank[1:], start=1):
        if not torch.allclose(torch.tensor(weights), first, rtol=1e-5, atol=1e-7):
            raise RuntimeError(
                f"step {step}: loss balancer weights differ between rank 0 {per_rank[0]} and rank {rank} "
                f"{weights} (loss.balancing); every rank must step it from the same all-reduced values"
            )


def save_checkpoint(tr: Training, run_dir: Path, progress: Progress, loader_state: dict, keep: int) -> None:
    """Every rank's loader position, gathered; rank 0 writes."""
    gathered = dst.gather(tr.dist, (loader_state, tr.balancer.weights().tolist()))
    states = [loader for loader, _ in gathered]
    _check_same_balancer([weights for _, weights in gathered], progress.step)
    if not tr.dist.main:
        return
    state = {
        "optimizers": [o.state_dict() for o in tr.opts],
        "schedulers": [s.state_dict() for s in tr.scheds],
        "torch_rng": torch.get_rng_state(),
        "balancer": tr.balancer.state_dict(),
    }
    if tr.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(tr.device)
    trainer = {"loader": states, "progress": asdict(progress)}
    best = progress.best_step == progress.step
    best_of = [t for t, (_, step) in progress.task_best.items() if step == progress.step]
    checkpoint.save(run_dir / "checkpoints", progress.step, tr.module, state, trainer, keep, best, best_of)


def _prepare_once(cfg: Config, d: dst.Dist) -> Path:
    """Rank 0 prepares (or finds) the data set first; the others then find it complete."""
    if d.main:
        features = prepare(cfg.data, cfg.task, cfg.seed)
    dst.barrier(d)
    return features if d.main else prepare(cfg.data, cfg.task, cfg.seed)


class _StepLog:
    """``train_log.jsonl``: one line per logged step; a resumed run first drops the lines past its step."""

    def __init__(self, path: Path, resumed_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= resumed_step]
            path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: Dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def check(cfg: Config) -> None:
    """Fail at start, naming the key, on settings that would otherwise fail mid-run."""
    check_loss_config(cfg.loss)
    tc, sp = cfg.trainer, cfg.data.split
    for key in (
        "max_steps",
        "eval_every",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite",
    ):
        if getattr(tc, key) < 1:
            raise ValueError(f"trainer.{key} must be >= 1, got {getattr(tc, key)}")
    for key in ("epochs", "patience"):
        if getattr(tc, key) is not None and getattr(tc, key) < 1:
            raise ValueError(f"trainer.{key} must be >= 1 or null, got {getattr(tc, key)}")
    if tc.eval_every_epochs < 1:
        raise ValueError(f"trainer.eval_every_epochs must be >= 1, got {tc.eval_every_epochs}")
    if cfg.loss.negatives < 1:
        raise ValueError(f"loss.negatives must be >= 1, got {cfg.loss.negatives}")
    from unirec.model.transitions import FITS

    if cfg.model.transitions_fit not in FITS:
        raise ValueError(f"model.transitions_fit must be one of {FITS}, got {cfg.model.transitions_fit!r}")
    for key in ("transitions_window", "transitions_recent"):
        if getattr(cfg.model, key) < 1:
            raise ValueError(f"model.{key} must be >= 1, got {getattr(cfg.model, key)}")
    if tc.progress_every_s < 0:
        raise ValueError(
            f"trainer.progress_every_s must be >= 0 (0: a line every step), got {tc.progress_every_s}"
        )
    if not (0 < sp.valid and 0 < sp.test and sp.valid + sp.test < 1):
        raise ValueError(
            f"data.split.valid and data.split.test must be > 0 with a sum < 1, got {sp.valid}, {sp.test}"
        )
    task, _, metric = tc.best_metric.partition("/")
    if tc.valid_protocol is ValidProtocol.full and metric not in FULL_METRICS:
        raise ValueError(
            f"trainer.best_metric={tc.best_metric!r}: trainer.valid_protocol=full computes {FULL_METRICS}; "
            f"pick one, e.g. trainer.best_metric=mean/ndcg@10"
        )
    if task != "mean" and task not in cfg.task:
        raise ValueError(
            f"trainer.best_metric={tc.best_metric!r}: {task!r} is neither 'mean' nor a selected task"
        )
    if task != "mean" and metric not in cfg.task[task].metrics:
        raise ValueError(f"trainer.best_metric={tc.best_metric!r}: task.{task}.metrics has no {metric!r}")
    if task == "mean" and not all(metric in t.metrics for t in cfg.task.values()):
        raise ValueError(
            f"trainer.best_metric={tc.best_metric!r}: not every selected task computes {metric!r}"
        )


def run(cfg: Config, run_dir: Path, features: Optional[Path] = None) -> Dict:
    """Train and evaluate; returns (and, on rank 0, writes to ``run_dir/metrics.json``) the per-task results."""
    check(cfg)
    d = dst.init("cuda" if setup_device(cfg.trainer)[0].type == "cuda" else "cpu")
    try:
        run_dir = Path(dst.broadcast(d, str(run_dir)))
        features = features or _prepare_once(cfg, d)
        return _loop(cfg, setup(cfg, features, d), features, run_dir)
    finally:
        dst.shutdown(d)


def _loop(cfg: Config, tr: Training, features: Path, run_dir: Path) -> Dict:
    from torch.utils.tensorboard import SummaryWriter

    tc, main = cfg.trainer, tr.dist.main
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = resume(tr, run_dir, tc)
    # purge_step drops the events an interrupted run logged past its last checkpoint.
    writer = (
        SummaryWriter(str(run_dir / "tb"), purge_step=progress.step + 1 if progress.step else None)
        if main
        else None
    )
    steplog = _StepLog(run_dir / "train_log.jsonl", progress.step, main)
    n_params = sum(p.numel() for p in tr.module.parameters())
    log.info("model %.2fM parameters on %s (bf16=%s, ranks=%d); train rows %s; task mix %s", n_params / 1e6,
             tr.device, tr.bf16, tr.dist.world, tr.loader.rows, {t: round(p, 3) for t, p in tr.loader.probs.items()})  # fmt: skip
    baseline = tr.validation.popularity(cfg.seed)
    bar = progress_bar(tr.plan.max_steps, progress.step, tc.progress and main, tc.progress_every_s)
    out = _Outputs(writer, steplog, bar)
    start = time.perf_counter()
    batches = tr.loader.batches(pin_memory=tr.device.type == "cuda")
    try:
        valid, samples = _steps(tc, tr, run_dir, progress, batches, out)
    finally:
        batches.close()  # stops the prefetch thread
        out.bar.close()
    if not valid:  # resumed at the very end: nothing left to train, still report
        valid = tr.validation.model(tr.module, tr.device)
    elapsed = time.perf_counter() - start
    result = {
        "valid": valid,
        "popularity": baseline,
        "steps": progress.step,
        "max_steps": tr.plan.max_steps,
        "steps_per_epoch": tr.plan.steps_per_epoch,
        "stopped_early": progress.stopped_early,
        "nonfinite_skipped": progress.skipped,
        "best": {
            "metric": tc.best_metric,
            "value": progress.best,
            "step": progress.best_step,
            "tasks": {t: {"value": v, "step": st} for t, (v, st) in progress.task_best.items()},
        },  # fmt: skip
        "train_seconds": round(elapsed, 2),
        "samples_per_s": round(samples / max(elapsed, 1e-9), 1),
        "parameters": n_params,
        "ranks": tr.dist.world,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "features": str(features),
    }
    if main:
        write_hparams(writer, _hparams(cfg), valid, progress.step)
        writer.close()
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
        print(format_table(valid, baseline))
        log.info("run directory %s", run_dir)
    return result


@dataclass
class _Outputs:
    """Where rank 0 reports (``writer`` is None on the other ranks)."""

    writer: object
    steplog: _StepLog
    bar: object


def _steps(tc: TrainerConfig, tr: Training, run_dir: Path, progress: Progress, batches, out: _Outputs):
    """The step loop proper; returns the last validation scores and the samples trained on."""
    main, writer = tr.dist.main, out.writer
    losses_log = TaskLossLog(tr.module.task_names, tr.device)
    start, samples, valid = time.perf_counter(), 0, {}
    plan = tr.plan
    for step in range(progress.step + 1, 0 if progress.stopped_early else plan.max_steps + 1):
        batch, loader_state = next(batches)
        last = step == plan.max_steps
        log_step = step % tc.log_every == 0 or last
        res = train_step(tr, batch.to(tr.device, non_blocking=True), grad_norms=log_step, step=step)
        progress.step, samples = step, samples + len(batch) * tr.dist.world
        _count_nonfinite(progress, res.stepped, step, tc, writer)
        if res.stepped:
            losses_log.add(res.losses, res.counts)
        if main and log_step:
            _log_step(out, tr, step, res, losses_log.flush(), samples / (time.perf_counter() - start))
        if step % plan.eval_every == 0 or last:
            valid = tr.validation.model(tr.module, tr.device)
            _track_best(progress, valid, tc.best_metric, step)
            if main:
                log_scalars(writer, "valid", valid, step)
            if tc.patience is not None and progress.since_best >= tc.patience:
                progress.stopped_early = last = True
                log.info("step %d: %d validations without a better %s (best %.4f at step %d); stopping early",
                         step, progress.since_best, tc.best_metric, progress.best, progress.best_step)  # fmt: skip
        new_best = progress.best_step == step or any(s == step for _, s in progress.task_best.values())
        if step % plan.checkpoint_every == 0 or last or new_best:
            save_checkpoint(tr, run_dir, progress, loader_state, tc.keep_checkpoints)
        out.bar.update(1)
        if progress.stopped_early:
            break
    return valid, samples


def _log_step(
    out: _Outputs, tr: Training, step: int, res: StepResult, per_task: Dict[str, float], samples_per_s: float
) -> None:
    """TensorBoard scalars and a train_log.jsonl line: per-task loss, balancer weight and gradient norm
    (a task absent from this step's batch has no gradient norm), the total, lr and throughput."""
    names, writer = tr.module.task_names, out.writer
    weights = dict(zip(names, tr.balancer.weights().tolist()))
    norms = {n: g for n, g, c in zip(names, res.grad_norms.tolist(), res.counts.tolist()) if c > 0}
    for prefix, values in (("loss", per_task), ("weight", weights), ("grad_norm", norms)):
        for name, value in values.items():
            writer.add_scalar(f"train/{name}/{prefix}", value, step)
    loss = res.loss.item()
    writer.add_scalar("train/loss", loss, step)
    writer.add_scalar("train/lr", tr.scheds[0].get_last_lr()[0], step)
    writer.add_scalar("train/samples_per_s", samples_per_s, step)
    out.steplog.write({"step": step, "loss": loss, "tasks": per_task, "stepped": res.stepped,
                       "weights": weights, "grad_norms": norms})  # fmt: skip
    out.bar.set_postfix(loss=f"{loss:.4f}")


def _count_nonfinite(progress: Progress, stepped: bool, step: int, tc: TrainerConfig, writer) -> None:
    if stepped:
        progress.skipped_in_a_row = 0
        return
    progress.skipped += 1
    progress.skipped_in_a_row += 1
    log.warning("step %d: non-finite loss or gradient, step skipped (%d so far)", step, progress.skipped)
    if writer is not None:
        writer.add_scalar("train/nonfinite_skipped", progress.skipped, step)
    if progress.skipped_in_a_row >= tc.max_nonfinite:
        raise NonFiniteError(
            f"{progress.skipped_in_a_row} consecutive steps up to step {step} had a NaN/Inf loss or gradient; "
            "stopping. Lower optim.lr, check the inputs, or resume from the last checkpoint "
            f"(trainer.max_nonfinite={tc.max_nonfinite})"
        )


def _track_best(progress: Progress, valid: Scores, key: str, step: int) -> None:
    """The run's best by ``key`` (and the validations since), and each task's best by its metric."""
    value = metric_value(valid, key)
    if progress.best is None or value > progress.best:
        progress.best, progress.best_step, progress.since_best = value, step, 0
    else:
        progress.since_best += 1
    metric = key.partition("/")[2]
    for task, scores in valid.items():
        if metric in scores and (
            task not in progress.task_best or scores[metric] > progress.task_best[task][0]
        ):
            progress.task_best[task] = [scores[metric], step]


def _hparams(cfg: Config) -> Dict[str, object]:
    return {
        "model.embedding_dim": cfg.model.embedding_dim,
        "model.hidden_dim": cfg.model.hidden_dim,
        "model.tower": cfg.model.tower,
        "model.tower_layers": cfg.model.tower_layers,
        "optim.lr": cfg.optim.lr,
        "loss.balancing": cfg.loss.balancing,
        "loader.batch_size": cfg.loader.batch_size,
        "loader.mix": getattr(cfg.loader.mix, "value", cfg.loader.mix),
        "trainer.max_steps": cfg.trainer.max_steps,
        "tasks": ",".join(sorted(cfg.task)),
        "seed": cfg.seed,
    }


register_configs()


@hydra.main(config_path=conf_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> Optional[float]:
    """The run's best validation ``trainer.best_metric``: the objective a Hydra sweeper maximises
    (``hparams_search=...``, Optuna); the full results are in the run directory's metrics.json."""
    from hydra.core.hydra_config import HydraConfig

    config = to_object(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run(config, run_dir)["best"]["value"]


if __name__ == "__main__":
    main()
