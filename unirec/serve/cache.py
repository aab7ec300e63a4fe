"""A bounded score cache with a time to live: the repeat of a request answers without the model."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Hashable, Optional

import numpy as np


class ScoreCache:
    """Least-recently-used entries, each valid for ``ttl_s`` seconds; thread-safe.

    Keys carry the model version, so a hot swap never answers with the old model's scores.

    >>> c = ScoreCache(size=1, ttl_s=60)
    >>> c.put("a", np.ones(2)); c.put("b", np.zeros(2))
    >>> c.get("a") is None, c.get("b").tolist()
    (True, [0.0, 0.0])
    """

    def __init__(self, size: int, ttl_s: float):
        self.size, self.ttl_s = size, ttl_s
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[np.ndarray]:
        if self.size <= 0:
            return None
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            expires, value = hit
            if expires < time.monotonic():
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl_s, value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
