"""The scoring threads of an environment: an executor that hands each job to the thread idle the shortest.

``ThreadPoolExecutor`` wakes its idle threads in turn, so a lone stream of requests alternates between
them: each request then starts on a thread whose CPU caches, allocator arena and core were last used a
request ago. On the serving benchmark (1,000 candidates, one request at a time, scoring with one torch
thread) two such threads answered 0.6-0.9 ms slower at the median than one thread did
(BENCHMARKS.md). :class:`WarmPool` keeps its idle threads on a stack: a job goes to the thread that
finished last, so at low load one thread does the work and the others wait, and under load every thread
takes jobs as it frees up, as before.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Executor, Future
from typing import Callable, Deque, List, Optional, Tuple

Job = Tuple[Future, Callable, tuple, dict]


class _Worker:
    def __init__(self) -> None:
        self.wake = threading.Event()
        self.job: Optional[Job] = None


class WarmPool(Executor):
    """A fixed pool of ``workers`` threads; idle threads are reused last-in, first-out.

    Args:
        workers: the number of threads (at least 1).
        name: the threads' name prefix.

    Example:
        >>> pool = WarmPool(2, "doc")
        >>> [pool.submit(pow, 2, k).result() for k in range(4)]
        [1, 2, 4, 8]
        >>> pool.shutdown()
    """

    def __init__(self, workers: int, name: str = "pool"):
        if workers < 1:
            raise ValueError(f"a pool needs at least one thread, got {workers}")
        self._lock = threading.Lock()
        self._idle: List[_Worker] = []  # a stack: the last one is the most recently idle
        self._queue: Deque[Job] = collections.deque()  # jobs no idle thread was there for
        self._shutdown = False
        self._threads = []
        for i in range(workers):
            w = _Worker()
            self._idle.insert(0, w)
            t = threading.Thread(target=self._run, args=(w,), name=f"{name}_{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, fn: Callable, /, *args, **kwargs) -> Future:
        future: Future = Future()
        job = (future, fn, args, kwargs)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._idle:
                w = self._idle.pop()
                w.job = job
                w.wake.set()
            else:
                self._queue.append(job)
        return future

    def _run(self, w: _Worker) -> None:
        while True:
            w.wake.wait()
            w.wake.clear()
            job, w.job = w.job, None
            while job is not None:
                future, fn, args, kwargs = job
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                        future.set_exception(e)
                del future, fn, args, kwargs  # no reference to the last job's data while idle
                with self._lock:
                    job = self._queue.popleft() if self._queue else None
                    if job is None:
                        if self._shutdown:
                            return
                        self._idle.append(w)
            if self._shutdown:
                return

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            idle, self._idle = self._idle, []
        for w in idle:
            w.wake.set()  # with no job: the thread ends
        if wait:
            for t in self._threads:
                t.join()
