"""Optimizers and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from unirec.config import OptimConfig


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> List[torch.optim.Optimizer]:
    """AdamW for every parameter, or SparseAdam for sparse embedding tables plus AdamW for the rest.

    Embedding tables get no weight decay: decaying every row each step would shrink rows that the batch
    never touched.
    """
    sparse, decay, no_decay = [], [], []
    for module in model.modules():
        for _name, p in module.named_parameters(recurse=False):
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                (sparse if module.sparse else no_decay).append(p)
            elif p.ndim < 2:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opts: List[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr)]
    if sparse:
        if not cfg.sparse_embeddings:
            raise ValueError("model has sparse embedding tables but optim.sparse_embeddings is false")
        opts.append(torch.optim.SparseAdam(sparse, lr=cfg.lr))
    return opts


def lr_factor(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``.

    >>> round(lr_factor(0, 100, OptimConfig(warmup_steps=10)), 2), lr_factor(10, 100, OptimConfig(warmup_steps=10))
    (0.1, 1.0)
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedulers(opts: List[torch.optim.Optimizer], max_steps: int, cfg: OptimConfig):
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, max_steps, cfg)) for o in opts]
