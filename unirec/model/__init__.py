"""The multi-task ranker: embedding trunk, shared tower, per-task heads."""

from unirec.model.ranker import MultiTaskRanker

__all__ = ["MultiTaskRanker"]
