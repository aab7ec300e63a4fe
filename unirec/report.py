"""What a run reports: per-task scalars to TensorBoard, the hyperparameters, and the final table."""

from __future__ import annotations

from typing import Dict, List

import torch

from unirec.metrics import Scores


class TaskLossLog:
    """Per-task mean loss over a logging interval, accumulated on the device (one sync per log)."""

    def __init__(self, names: List[str], device: torch.device):
        self.names = names
        self.sum = torch.zeros(len(names), device=device)
        self.n = torch.zeros(len(names), device=device)

    def add(self, losses: torch.Tensor, counts: torch.Tensor) -> None:
        present = (counts > 0).float()
        self.sum += losses.detach() * present
        self.n += present

    def flush(self) -> Dict[str, float]:
        """Mean loss of each task seen since the last flush (tasks absent all interval are left out)."""
        out = {name: total / n for name, total, n in zip(self.names, self.sum.tolist(), self.n.tolist()) if n}
        self.sum.zero_()
        self.n.zero_()
        return out


def log_scalars(writer, split: str, scores: Scores, step: int) -> None:
    for task, metrics in scores.items():
        for name, value in metrics.items():
            writer.add_scalar(f"{split}/{task}/{name}", value, step)


def metric_value(scores: Scores, key: str) -> float:
    """``<task or mean>/<metric>`` of a score table, e.g. ``mean/auc`` or ``home/ndcg@10``."""
    task, _, metric = key.partition("/")
    try:
        if task == "mean":
            return sum(s[metric] for s in scores.values()) / len(scores)
        return scores[task][metric]
    except (KeyError, ZeroDivisionError):
        raise KeyError(
            f"trainer.best_metric={key!r} is not among the valid metrics {sorted(scores)}"
        ) from None


def write_hparams(writer, hparams_: Dict[str, object], valid: Scores, step: int) -> None:
    from torch.utils.tensorboard.summary import hparams

    metrics = {f"hparam/{t}/{m}": v for t, ms in valid.items() for m, v in ms.items()}
    for summary in hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams_.items()},
                           metrics):  # fmt: skip
        writer.file_writer.add_summary(summary)
    for name, value in metrics.items():
        writer.add_scalar(name, value, step)


def format_table(model: Scores, baseline: Scores, title: str = "valid metrics") -> str:
    """Per-task metrics, the model beside the popularity baseline."""
    names = sorted({m for ms in model.values() for m, v in ms.items() if isinstance(v, float)})
    head = f"{'task':<10}" + "".join(f"{n:>22}" for n in names)
    lines = [f"{title}: model (popularity)", head, "-" * len(head)]
    for task in model:
        cells = "".join(f"{model[task][n]:>13.4f} ({baseline[task][n]:.4f})" for n in names)
        lines.append(f"{task:<10}{cells}")
    return "\n".join(lines)
