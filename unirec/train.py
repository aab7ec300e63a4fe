"""``python -m unirec.train``: compose the config, prepare the data, run the step loop, report per task.

Examples::

    python -m unirec.train                                   # synthetic canvases, all four tasks
    python -m unirec.train task=[home,search] model.embedding_dim=32 trainer.max_steps=100
    python -m unirec.train -m optim.lr=1e-3,3e-3             # a sweep (Hydra multirun)

The run directory (``runs/<date>/<time>`` by default) receives TensorBoard events, checkpoints, the
composed config and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from unirec import checkpoint
from unirec.config import Config, TrainerConfig, conf_dir, register_configs, to_object
from unirec.data.loader import MixedLoader
from unirec.data.prepare import prepare
from unirec.evaluate import Scores, evaluate, model_scorer, popularity_scorer
from unirec.losses import task_losses, total_loss
from unirec.model import MultiTaskRanker
from unirec.optim import build_optimizers, build_schedulers
from unirec.schema import FeatureSpec

log = logging.getLogger("unirec.train")


def setup_device(cfg: TrainerConfig) -> tuple[torch.device, bool]:
    """The device, and whether to autocast to bf16 (CUDA only unless asked)."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu"
            )
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return device, bf16


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_step(model, batch, opts, scheds, loss_weights: torch.Tensor, bf16: bool):
    """One optimisation step on a batch already on the device; returns (total, per-task losses, counts)."""
    with _autocast(batch.label.device, bf16):
        logits = model(batch)
    losses, counts = task_losses(
        logits, batch.label, batch.weight, model.head_index(batch.task_type), len(loss_weights)
    )
    loss = total_loss(losses, loss_weights)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o, s in zip(opts, scheds):
        o.step()
        s.step()
    return loss, losses, counts


def _log_scalars(writer, split: str, scores: Scores, step: int) -> None:
    for task, metrics in scores.items():
        for name, value in metrics.items():
            writer.add_scalar(f"{split}/{task}/{name}", value, step)


@dataclass
class Training:
    """Everything the step loop needs, built from the config by :func:`setup`."""

    spec: FeatureSpec
    model: MultiTaskRanker
    opts: List[torch.optim.Optimizer]
    scheds: list
    loader: MixedLoader
    loss_weights: torch.Tensor
    device: torch.device
    bf16: bool


def setup(cfg: Config, features: Path) -> Training:
    """Model, optimizers, schedules and loader for ``cfg`` on the prepared ``features``."""
    torch.manual_seed(cfg.seed)
    spec = FeatureSpec.load(features / "feature_spec.json")
    device, bf16 = setup_device(cfg.trainer)
    model = MultiTaskRanker(spec, cfg.model, sparse=cfg.optim.sparse_embeddings).to(device)
    opts = build_optimizers(model, cfg.optim)
    scheds = build_schedulers(opts, cfg.trainer.max_steps, cfg.optim)
    weights = {t: c.sampling_weight for t, c in cfg.task.items()}
    loader = MixedLoader(features, spec, cfg.loader, weights, cfg.seed)
    loss_weights = torch.tensor([spec.tasks[t].loss_weight for t in model.task_names], device=device)
    return Training(spec, model, opts, scheds, loader, loss_weights, device, bf16)


class _TaskLossLog:
    """Per-task mean loss over a logging interval, accumulated on the device (one sync per log)."""

    def __init__(self, names: List[str], device: torch.device):
        self.names = names
        self.sum = torch.zeros(len(names), device=device)
        self.n = torch.zeros(len(names), device=device)

    def add(self, losses: torch.Tensor, counts: torch.Tensor) -> None:
        present = (counts > 0).float()
        self.sum += losses.detach() * present
        self.n += present

    def flush(self, writer, step: int) -> None:
        for name, total, n in zip(self.names, self.sum.tolist(), self.n.tolist()):
            if n:
                writer.add_scalar(f"train/{name}/loss", total / n, step)
        self.sum.zero_()
        self.n.zero_()


def run(cfg: Config, run_dir: Path, features: Optional[Path] = None) -> Dict:
    """Train and evaluate; returns (and writes to ``run_dir/metrics.json``) the per-task results."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    features = features or prepare(cfg.data, cfg.task, cfg.seed)
    tr = setup(cfg, features)
    tc = cfg.trainer
    writer = SummaryWriter(str(run_dir / "tb"))
    n_params = sum(p.numel() for p in tr.model.parameters())
    log.info("model %.2fM parameters on %s (bf16=%s); train rows %s; task mix %s", n_params / 1e6, tr.device,
             tr.bf16, tr.loader.rows, {t: round(p, 3) for t, p in tr.loader.probs.items()})  # fmt: skip
    baseline = evaluate(popularity_scorer(features, tr.spec, cfg.seed), features, tr.spec, "valid",
                        tc.eval_batch_size)  # fmt: skip
    losses_log = _TaskLossLog(tr.model.task_names, tr.device)
    bar = tqdm(total=tc.max_steps, disable=not tc.progress, desc="train", unit="step")
    start, samples, valid = time.perf_counter(), 0, {}
    batches = iter(tr.loader)
    for step in range(1, tc.max_steps + 1):
        batch = next(batches).to(tr.device, non_blocking=True)
        loss, losses, counts = train_step(tr.model, batch, tr.opts, tr.scheds, tr.loss_weights, tr.bf16)
        samples += len(batch)
        losses_log.add(losses, counts)
        last = step == tc.max_steps
        if step % tc.log_every == 0 or last:
            losses_log.flush(writer, step)
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", tr.scheds[0].get_last_lr()[0], step)
            writer.add_scalar("train/samples_per_s", samples / (time.perf_counter() - start), step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % tc.eval_every == 0 or last:
            valid = validate(tr, features, tc.eval_batch_size)
            _log_scalars(writer, "valid", valid, step)
        if step % tc.checkpoint_every == 0 or last:
            checkpoint.save(run_dir / "checkpoints", step, tr.model, {"step": step})
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    result = {
        "valid": valid,
        "popularity": baseline,
        "steps": tc.max_steps,
        "train_seconds": round(elapsed, 2),
        "samples_per_s": round(samples / elapsed, 1),
        "parameters": n_params,
        "features": str(features),
    }
    _write_hparams(writer, cfg, valid)
    writer.close()
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    print(format_table(valid, baseline))
    log.info("run directory %s", run_dir)
    return result


def validate(tr: Training, features: Path, batch_size: int) -> Scores:
    """Per-task metrics of the model on the valid split (eval mode, then back to train mode)."""
    tr.model.eval()
    try:
        return evaluate(model_scorer(tr.model, tr.device, tr.bf16), features, tr.spec, "valid", batch_size)
    finally:
        tr.model.train()


def _write_hparams(writer, cfg: Config, valid: Scores) -> None:
    from torch.utils.tensorboard.summary import hparams

    flat = {
        "model.embedding_dim": cfg.model.embedding_dim,
        "model.hidden_dim": cfg.model.hidden_dim,
        "model.tower_layers": cfg.model.tower_layers,
        "optim.lr": cfg.optim.lr,
        "loader.batch_size": cfg.loader.batch_size,
        "loader.mix": str(getattr(cfg.loader.mix, "value", cfg.loader.mix)),
        "trainer.max_steps": cfg.trainer.max_steps,
        "tasks": ",".join(sorted(cfg.task)),
        "seed": cfg.seed,
    }
    metrics = {f"hparam/{t}/{m}": v for t, ms in valid.items() for m, v in ms.items()}
    for summary in hparams(flat, metrics):
        writer.file_writer.add_summary(summary)
    for name, value in metrics.items():
        writer.add_scalar(name, value, cfg.trainer.max_steps)


def format_table(model: Scores, baseline: Scores) -> str:
    """Per-task valid metrics, the model beside the popularity baseline."""
    names = sorted({m for ms in model.values() for m in ms})
    head = f"{'task':<10}" + "".join(f"{n:>22}" for n in names)
    lines = ["valid metrics: model (popularity)", head, "-" * len(head)]
    for task in model:
        cells = "".join(f"{model[task][n]:>13.4f} ({baseline[task][n]:.4f})" for n in names)
        lines.append(f"{task:<10}{cells}")
    return "\n".join(lines)


register_configs()


@hydra.main(config_path=conf_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> Dict:
    from hydra.core.hydra_config import HydraConfig

    config = to_object(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run(config, run_dir)


if __name__ == "__main__":
    main()
