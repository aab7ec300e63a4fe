"""Micro-batching: concurrent requests of one environment merged into one forward pass.

A request's own work (featurizing its context, the context encoder, its candidates' rows, any target-aware
attention: :meth:`Scorer.encode`) stays per request; the tower and the task head, which dominate at a
hundred candidates and more, run once over the rows of every request in the batch
(:meth:`Scorer.score_encoded`). That pays the per-forward cost (operator dispatch, thread hand-offs) once
per batch instead of once per request.

A batch starts when it holds ``max_batch`` requests or when its first request has waited ``window_s``,
whichever comes first; it runs on the environment's scoring threads, never on the event loop. Each
request keeps its own time budget and fallback: it awaits its own future, and one that times out is
answered by its fallback at once while the batch runs on (its rows, if not yet encoded, are skipped). An
input error (:class:`RequestError`) fails only its own request; an error of the merged forward fails every
request of that batch, each then answered by its own fallback.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from unirec.serve.scorer import Scorer


@dataclass
class _Pending:
    scorer: Scorer
    task: str
    context: Mapping[str, object]
    ids: Sequence[object]
    future: asyncio.Future


class MicroBatcher:
    """Collects requests on the event loop and scores each batch on ``pool`` in one forward pass.

    Args:
        pool: the environment's scoring threads.
        window_s: the longest a request waits for others to join its batch.
        max_batch: requests in a batch at most; a full batch starts at once.

    Shapes: ``score`` -> [N] post-sigmoid scores of one request, as :meth:`Scorer.score` returns them.
    """

    def __init__(self, pool: Executor, window_s: float, max_batch: int):
        self.pool, self.window_s, self.max_batch = pool, window_s, max_batch
        self._pending: List[_Pending] = []
        self._timer: Optional[asyncio.TimerHandle] = None

    async def score(
        self, scorer: Scorer, task: str, context: Mapping[str, object], ids: Sequence
    ) -> np.ndarray:
        """This request's scores, from the forward pass of whichever batch it joins; cancel it (a timeout)
        and the batch leaves it out if it has not been encoded yet."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Pending(scorer, task, context, ids, future))
        if len(self._pending) >= self.max_batch:
            self._start(loop)
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._start, loop)
        return await future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            self.pool.submit(_run, batch, loop)


def _run(batch: List[_Pending], loop: asyncio.AbstractEventLoop) -> None:
    """On a scoring thread: encode each request of the batch, then one forward per (scorer, task).

    Requests of one batch may hold different scorers (a new model version came in between them) or tasks
    (an environment that serves another task by name); each group is its own forward pass."""
    groups: Dict[tuple, List[_Pending]] = defaultdict(list)
    for p in batch:
        groups[(id(p.scorer), p.task)].append(p)
    for members in groups.values():
        encoded, waiting = [], []
        for p in members:
            if p.future.cancelled():  # timed out before its turn: its fallback has answered already
                continue
            try:
                encoded.append(p.scorer.encode(p.task, p.context, p.ids))
                waiting.append(p.future)
            except Exception as e:  # noqa: BLE001 - this request's own error (bad input), answered to it alone
                loop.call_soon_threadsafe(_fail, p.future, e)
        if not encoded:
            continue
        try:
            scores = members[0].scorer.score_encoded(encoded)
        except Exception as e:  # noqa: BLE001 - every request of the batch falls back on its own
            for f in waiting:
                loop.call_soon_threadsafe(_fail, f, e)
            continue
        for f, s in zip(waiting, scores):
            loop.call_soon_threadsafe(_succeed, f, s)


def _succeed(future: asyncio.Future, scores: np.ndarray) -> None:
    if not future.done():
        future.set_result(scores)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
