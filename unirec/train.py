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
from pathlib import Path
from typing import Dict, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from unirec import checkpoint
from unirec.config import Config, TrainerConfig, register_configs, to_object
from unirec.data.loader import MixedLoader
from unirec.data.prepare import prepare
from unirec.evaluate import Scores, evaluate, model_scorer, popularity_scorer
from unirec.losses import task_losses, total_loss
from unirec.model import MultiTaskRanker
from unirec.optim import build_optimizers, build_schedulers
from unirec.schema import FeatureSpec

log = logging.getLogger("unirec.train")


def _conf_dir() -> str:
    """conf/ ships inside the wheel as unirec/conf; in a source checkout it sits beside the package."""
    here = Path(__file__).resolve().parent
    installed = here / "conf"
    return str(installed if installed.is_dir() else here.parent / "conf")


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


def _log_scalars(writer, split: str, scores: Scores, step: int) -> None:
    for task, metrics in scores.items():
        for name, value in metrics.items():
            writer.add_scalar(f"{split}/{task}/{name}", value, step)


def run(cfg: Config, run_dir: Path, features: Optional[Path] = None) -> Dict:
    """Train and evaluate; returns (and writes to ``run_dir/metrics.json``) the per-task results."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    features = features or prepare(cfg.data, cfg.task, cfg.seed)
    spec = FeatureSpec.load(features / "feature_spec.json")
    device, bf16 = setup_device(cfg.trainer)
    model = MultiTaskRanker(spec, cfg.model, sparse=cfg.optim.sparse_embeddings).to(device)
    opts = build_optimizers(model, cfg.optim)
    scheds = build_schedulers(opts, cfg.trainer.max_steps, cfg.optim)
    loader = MixedLoader(
        features, spec, cfg.loader, {t: c.sampling_weight for t, c in cfg.task.items()}, cfg.seed
    )
    loss_weights = torch.tensor([spec.tasks[t].loss_weight for t in model.task_names], device=device)
    writer = SummaryWriter(str(run_dir / "tb"))
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "model %.2fM parameters on %s (bf16=%s); train rows %s; mix %s",
        n_params / 1e6,
        device,
        bf16,
        loader.rows,
        {t: round(p, 3) for t, p in loader.probs.items()},
    )

    def validate(step: int) -> Scores:
        model.eval()
        scores = evaluate(
            model_scorer(model, device, bf16), features, spec, "valid", cfg.trainer.eval_batch_size
        )
        model.train()
        _log_scalars(writer, "valid", scores, step)
        return scores

    baseline = evaluate(
        popularity_scorer(features, spec, cfg.seed), features, spec, "valid", cfg.trainer.eval_batch_size
    )
    K = len(model.task_names)
    loss_sum, loss_n = torch.zeros(K, device=device), torch.zeros(K, device=device)
    start, samples, valid = time.perf_counter(), 0, {}
    bar = tqdm(total=cfg.trainer.max_steps, disable=not cfg.trainer.progress, desc="train", unit="step")
    batches = iter(loader)
    for step in range(1, cfg.trainer.max_steps + 1):
        batch = next(batches).to(device, non_blocking=True)
        with _autocast(device, bf16):
            logits = model(batch)
        losses, counts = task_losses(logits, batch.label, batch.weight, model.head_index(batch.task_type), K)
        loss = total_loss(losses, loss_weights)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
        samples += len(batch)
        present = (counts > 0).float()
        loss_sum += losses.detach() * present
        loss_n += present
        if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
            mean = (loss_sum / loss_n.clamp_min(1)).tolist()
            for name, value, n in zip(model.task_names, mean, loss_n.tolist()):
                if n:
                    writer.add_scalar(f"train/{name}/loss", value, step)
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", scheds[0].get_last_lr()[0], step)
            writer.add_scalar("train/samples_per_s", samples / (time.perf_counter() - start), step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            loss_sum.zero_()
            loss_n.zero_()
        if step % cfg.trainer.eval_every == 0 or step == cfg.trainer.max_steps:
            valid = validate(step)
        if step % cfg.trainer.checkpoint_every == 0 or step == cfg.trainer.max_steps:
            checkpoint.save(run_dir / "checkpoints", step, model, {"step": step})
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start
    result = {
        "valid": valid,
        "popularity": baseline,
        "steps": cfg.trainer.max_steps,
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


@hydra.main(config_path=_conf_dir(), config_name="train", version_base=None)
def main(cfg: DictConfig) -> Dict:
    from hydra.core.hydra_config import HydraConfig

    config = to_object(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run(config, run_dir)


if __name__ == "__main__":
    main()
