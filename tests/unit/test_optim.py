import math

import torch

from unirec.config import LoaderConfig, ModelConfig, OptimConfig
from unirec.data.loader import MixedLoader
from unirec.model import MultiTaskRanker
from unirec.optim import build_optimizers, build_schedulers
from unirec.schema import FeatureSpec
from unirec.train import train_step


def _losses(features, sparse: bool, steps: int = 25):
    spec = FeatureSpec.load(features / "feature_spec.json")
    torch.manual_seed(0)
    model = MultiTaskRanker(spec, ModelConfig(embedding_dim=8, hidden_dim=16), sparse=sparse)
    cfg = OptimConfig(lr=1e-2, sparse_embeddings=sparse, warmup_steps=2)
    opts = build_optimizers(model, cfg)
    scheds = build_schedulers(opts, steps, cfg)
    ld = MixedLoader(features, spec, LoaderConfig(batch_size=256, prefetch=0), {}, 0)
    weights = torch.ones(len(spec.tasks))
    return [
        train_step(model, ld.next_batch(), opts, scheds, weights, False)[0].item() for _ in range(steps)
    ], opts


def test_dense_adamw_learns(toy_features):
    losses, opts = _losses(toy_features, sparse=False)
    assert len(opts) == 1 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_sparse_embeddings_step_with_sparse_adam(toy_features):
    losses, opts = _losses(toy_features, sparse=True)
    assert [type(o).__name__ for o in opts] == ["AdamW", "SparseAdam"]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_schedule_warms_up_then_decays_to_floor():
    from unirec.optim import lr_factor

    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(101)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0 and abs(f[100] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
