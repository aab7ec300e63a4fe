import math

from unirec.config import OptimConfig, compose
from unirec.optim import lr_factor
from unirec.train import setup, train_step


def _losses(features, sparse: bool, steps: int = 25):
    cfg = compose(["debug=toy", "model.embedding_dim=8", "model.hidden_dim=16", f"optim.sparse_embeddings={sparse}",
                   "optim.warmup_steps=2", f"trainer.max_steps={steps}", "loader.batch_size=256", "loader.prefetch=0"])  # fmt: skip
    tr = setup(cfg, features)
    losses = [train_step(tr, tr.loader.next_batch())[0].item() for _ in range(steps)]
    return losses, tr.opts


def test_dense_adamw_learns(toy_features):
    losses, opts = _losses(toy_features, sparse=False)
    assert len(opts) == 1 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_sparse_embeddings_step_with_sparse_adam(toy_features):
    losses, opts = _losses(toy_features, sparse=True)
    assert [type(o).__name__ for o in opts] == ["AdamW", "SparseAdam"]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_schedule_warms_up_then_decays_to_floor():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(101)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[10] == 1.0 and abs(f[100] - 0.1) < 1e-9
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_resident_loader_trains(toy_features):
    cfg = compose(["debug=toy", "model.embedding_dim=8", "model.hidden_dim=16", "loader.resident=true",
                   "loader.batch_size=256", "trainer.max_steps=25"])  # fmt: skip
    tr = setup(cfg, toy_features)
    batches = tr.loader.batches()
    losses = [train_step(tr, next(batches)[0])[0].item() for _ in range(25)]
    assert sum(losses[-5:]) < sum(losses[:5])
