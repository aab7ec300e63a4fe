"""One environment = the artifact deployed for one use case with its own knobs (``conf/serve/<env>.yaml``).

:class:`Environment` turns a validated request into an answer: candidate rules (limits, type filter,
exclude seen), the score cache, scoring on the environment's own threads under its time budget (each request
alone, or micro-batched with concurrent ones: :mod:`unirec.serve.batching`), and the
fallback (popularity, given order, or an error) when scoring times out, raises or returns non-finite
scores. It knows nothing of HTTP; :mod:`unirec.serve.app` maps its results and errors to responses.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa

from unirec.data.ids import normalise_ids
from unirec.serve.batching import MicroBatcher
from unirec.serve.cache import ScoreCache
from unirec.serve.config import EnvironmentConfig, Fallback, HistorySource
from unirec.serve.scorer import RequestError, Scorer

log = logging.getLogger("unirec.serve")


class Overloaded(RuntimeError):
    """More requests in flight than the environment's max_concurrent."""


@dataclass
class Answer:
    """What the environment answers: candidates in rank order with their scores, and how it got them."""

    ids: List[object]
    ctype: str
    scores: Union[np.ndarray, List[Optional[float]]]
    """[N] float64 when scored; a list where a fallback answered (None: no score)."""
    cached: bool = False
    ignored: List[str] = field(default_factory=list)
    reason: Optional[str] = None
    """timeout, error or non_finite when a fallback answered."""
    fallback: Optional[Fallback] = None
    detail: Optional[str] = None


class Environment:
    """The runtime of one environment: its scoring threads, cache and in-flight count.

    Args:
        name: environment name (the ``serve`` group option).
        cfg: its knobs.
    """

    def __init__(self, name: str, cfg: EnvironmentConfig):
        self.name, self.cfg = name, cfg
        self.cache = ScoreCache(cfg.cache.size, cfg.cache.ttl_s, cfg.cache.max_bytes)
        self.pool = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix=f"score-{name}")
        self.batcher = (
            MicroBatcher(self.pool, cfg.threads, cfg.batch_window_ms / 1000, cfg.max_batch)
            if cfg.batch_window_ms > 0
            else None
        )
        self.inflight = 0

    def warm_up(self, scorer: Scorer) -> None:
        """Start every scoring thread with one real scoring call, so the first requests do not pay for it."""
        ids = scorer.popular(self.cfg.task, 8) or ["0"]
        futures = [self.pool.submit(scorer.score, self.cfg.task, {}, ids) for _ in range(self.cfg.threads)]
        for f in futures:
            f.result()

    def admit(self) -> None:
        """Count a request in; refuse at once (no queueing) beyond max_concurrent."""
        if self.inflight >= self.cfg.max_concurrent:
            raise Overloaded(f"environment {self.name!r} has {self.inflight} requests in flight")
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    def candidates(self, scorer: Scorer, task: str, req) -> Tuple[List[object], str]:
        """The request's candidate ids and type after the limits and business rules."""
        own = scorer.spec.tasks[task].candidate
        c = req.candidates
        if hasattr(c, "source"):
            if c.limit > self.cfg.max_candidates:
                raise RequestError(
                    "candidates.limit", f"{c.limit} exceeds max_candidates={self.cfg.max_candidates}"
                )
            ids, ctype = list(scorer.popular(task, c.limit + len(req.seen))), own
        else:
            if len(c.ids) > self.cfg.max_candidates:
                raise RequestError(
                    "candidates.ids", f"{len(c.ids)} ids exceed max_candidates={self.cfg.max_candidates}"
                )
            ids, ctype = c.ids, c.type or own
        allowed = self.cfg.candidate_types or [own]
        if ctype not in allowed or ctype != own:
            raise RequestError(
                "candidates.type", f"{ctype!r} is not served here; allowed: {allowed} (task {task}: {own})"
            )
        if self.cfg.exclude_seen and req.seen:
            seen = set(canonical(req.seen))
            ids = [i for i, c in zip(ids, canonical(ids)) if c not in seen]
        if hasattr(c, "source"):
            ids = ids[: c.limit]
        return ids, ctype

    async def rank(self, scorer: Scorer, task: str, req) -> Answer:
        """Score and order the request's candidates, or answer the fallback; RequestError names bad input."""
        context = req.context.model_dump(exclude_none=True)
        _, ignored = scorer.check_context(task, context)
        context = scorer.with_history(task, context, HistorySource(self.cfg.history).value)
        ids, ctype = self.candidates(scorer, task, req)
        top_k = req.top_k or self.cfg.default_top_k
        if not ids:
            return Answer([], ctype, [], ignored=ignored)
        key = None
        if self.cache.size > 0:  # the key costs a pass over the ids: only where there is a cache
            key = (
                scorer.version,
                task,
                tuple(sorted((k, str(v)) for k, v in context.items())),
                tuple(map(str, ids)),
            )
        scores = None if key is None else self.cache.get(key)
        cached = scores is not None
        reason, detail = None, None
        if not cached:
            scores, reason, detail = await self._score(scorer, task, context, ids, req.timeout_ms)
            if reason is None and key is not None:
                self.cache.put(key, scores)
        if reason is None:
            order = np.argsort(-scores, kind="stable")[:top_k]
            # Python ints index the list several times faster than numpy scalars do; map keeps it in C
            ranked = list(map(ids.__getitem__, order.tolist()))
            return Answer(ranked, ctype, scores[order], cached, ignored)  # orjson writes the array as it is
        fallback = req.fallback or self.cfg.fallback
        answer = self.fallback(scorer, task, ids, ctype, fallback, top_k)
        answer.ignored, answer.reason, answer.fallback, answer.detail = ignored, reason, fallback, detail
        return answer

    async def _score(self, scorer: Scorer, task: str, context, ids: Sequence, timeout_ms: Optional[float]):
        """(scores, None, None) or (None, reason, detail): a slow, failing or NaN scorer never escapes as an error."""
        budget = (timeout_ms or self.cfg.timeout_ms) / 1000
        if self.batcher is not None:
            future = self.batcher.score(scorer, task, context, ids)
        else:
            future = asyncio.get_running_loop().run_in_executor(self.pool, scorer.score, task, context, ids)
        try:
            scores = await asyncio.wait_for(future, budget)
        except asyncio.TimeoutError:
            return None, "timeout", f"scoring took longer than {budget * 1000:.0f} ms"
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - any scorer failure is answered by the fallback, and logged
            log.exception("environment %s: scorer failed", self.name)
            return None, "error", f"{type(e).__name__}: {e}"[:300]
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(ids),) or not np.isfinite(scores).all():
            return (
                None,
                "non_finite",
                f"scorer returned {scores.shape} scores, finite: {bool(np.isfinite(scores).all())}",
            )
        return scores, None, None

    @staticmethod
    def fallback(scorer: Scorer, task: str, ids: List, ctype: str, how: Fallback, top_k: int) -> Answer:
        """Popularity order (ties keep the caller's order) or the caller's order; ``error`` ranks nothing."""
        if how == Fallback.popularity:
            share = scorer.popularity(task, canonical(ids))
            order = np.argsort(-share, kind="stable")[:top_k]
            return Answer([ids[i] for i in order.tolist()], ctype, share[order].tolist())
        if how == Fallback.given_order:
            return Answer(list(ids[:top_k]), ctype, [None] * min(top_k, len(ids)))
        return Answer([], ctype, [])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def canonical(ids: Sequence) -> List[Optional[str]]:
    """Ids as the scorer matches them (:func:`unirec.data.ids.normalise_ids`): ``"0111"``, ``" 111"`` and
    ``111`` are one id in exclusion and fallbacks as in scoring.

    >>> canonical(["0111", 111, " x "])
    ['111', '111', 'x']
    """
    return normalise_ids(pa.array([str(i) for i in ids], pa.string())).to_pylist()
