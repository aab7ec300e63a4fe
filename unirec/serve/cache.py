"""A bounded score cache with a time to live: the repeat of a request answers without the model."""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from typing import Hashable, Optional

import numpy as np


class ScoreCache:
    """Least-recently-used entries, each valid for ``ttl_s`` seconds; thread-safe.

    Bounded twice: at most ``size`` entries and at most ``max_bytes`` of keys and scores together. Keys hold
    the caller's context and candidate ids, so a count alone would let a few large requests keep any amount
    of memory. Keys carry the model version, so a hot swap never answers with the old model's scores.

    >>> c = ScoreCache(size=1, ttl_s=60)
    >>> c.put("a", np.ones(2)); c.put("b", np.zeros(2))
    >>> c.get("a") is None, c.get("b").tolist()
    (True, [0.0, 0.0])
    >>> c = ScoreCache(size=100, ttl_s=60, max_bytes=2_000)
    >>> for i in range(100): c.put(("x" * 100, i), np.ones(10))
    >>> 0 < len(c) < 100, c.nbytes <= 2_000
    (True, True)
    """

    def __init__(self, size: int, ttl_s: float, max_bytes: int = 64 * 2**20):
        self.size, self.ttl_s, self.max_bytes = size, ttl_s, max_bytes
        self.nbytes = 0
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        if self.size <= 0:
            return None
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            expires, value, _ = hit
            if expires < time.monotonic():
                self._drop(key)
                return None
            self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        cost = footprint(key) + sys.getsizeof(value)
        if cost > self.max_bytes:
            return  # would evict everything else and still not fit
        with self._lock:
            if key in self._data:
                self._drop(key)
            self._data[key] = (time.monotonic() + self.ttl_s, value, cost)
            self.nbytes += cost
            while len(self._data) > self.size or self.nbytes > self.max_bytes:
                self._drop(next(iter(self._data)))

    def _drop(self, key: Hashable) -> None:
        self.nbytes -= self._data.pop(key)[2]


def footprint(key: object) -> int:
    """Bytes a key holds: its strings and tuples, nested (the shape of the environments' cache keys).

    >>> footprint(("v1", ("a" * 1000,))) > 1000
    True
    """
    if isinstance(key, tuple):
        return sys.getsizeof(key) + sum(footprint(k) for k in key)
    return sys.getsizeof(key)
