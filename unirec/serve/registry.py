"""The model in service, and the registry poller that hot-swaps newer versions in.

A new version is verified (every hash), loaded and warmed up (the catalogue encoded, one request per task,
finite scores) on the poller's thread while the old one keeps serving; only then does one attribute
assignment put it into service. A request holds the scorer it started with, so none is dropped mid-swap.
A version that fails any step is refused, remembered (not retried on every poll) and counted; the old one
keeps serving and the service stays ready.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

from unirec.export import ArtifactError, versions
from unirec.serve.scorer import Scorer

log = logging.getLogger("unirec.serve")

# A check of a loaded scorer against the API in service: None when compatible, else the reason.
Compatibility = Callable[[Scorer], Optional[str]]


class ModelHolder:
    """Holds the :class:`Scorer` in service and replaces it with newer registry versions.

    Args:
        registry: the model registry directory.
        pinned: serve exactly this version and never poll (None: the newest, followed).
        on_swap: called with (old version or None, new version) after each swap (metrics).
        on_refuse: called with (version, reason) for each refused version (metrics).
    """

    def __init__(
        self,
        registry: Path,
        pinned: Optional[str] = None,
        on_swap: Callable[[Optional[str], str], None] = lambda old, new: None,
        on_refuse: Callable[[str, str], None] = lambda version, reason: None,
    ):
        self.registry = Path(registry)
        self.pinned = pinned
        self.scorer: Optional[Scorer] = None
        self.refused: Dict[str, str] = {}
        self.compatible: Compatibility = lambda scorer: None
        self._on_swap, self._on_refuse = on_swap, on_refuse
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @property
    def version(self) -> Optional[str]:
        s = self.scorer
        return s.version if s else None

    def load_initial(self) -> Scorer:
        """The pinned version, else the newest version that passes (older ones are tried in turn)."""
        candidates = [self.pinned] if self.pinned else list(reversed(versions(self.registry)))
        if not candidates:
            raise ArtifactError(
                f"no model version in registry {self.registry}; publish one with python -m unirec.export"
            )
        for version in candidates:
            if self._try(version):
                return self.scorer  # type: ignore[return-value]
        raise ArtifactError(f"no loadable model version in {self.registry}; refused: {self.refused}")

    def poll_once(self) -> Optional[str]:
        """Swap in the newest version if it is newer than the one serving and passes; returns it, else None."""
        if self.pinned:
            return None
        with self._lock:
            newest = [v for v in versions(self.registry) if v not in self.refused]
            if not newest or (self.version is not None and newest[-1] <= self.version):
                return None
            return newest[-1] if self._try(newest[-1]) else None

    def start(self, interval_s: float) -> None:
        """Poll every ``interval_s`` seconds on a daemon thread (no-op when 0 or pinned)."""
        if interval_s <= 0 or self.pinned or self._thread:
            return
        self._thread = threading.Thread(
            target=self._run, args=(interval_s,), name="registry-poller", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any surprise; it is logged
                log.exception("registry poll failed; the model in service is unchanged")

    def _try(self, version: str) -> bool:
        path = self.registry / version
        try:
            scorer = Scorer.load(path)
            reason = self.compatible(scorer)
            if reason:
                raise ArtifactError(f"{path}: {reason}")
        except (ArtifactError, OSError, ValueError, RuntimeError, KeyError) as e:
            self.refused[version] = str(e)
            log.error("refused model version %s: %s", version, e)
            self._on_refuse(version, str(e))
            return False
        old = self.version
        self.scorer = scorer
        self._on_swap(old, version)
        log.warning("serving model version %s (was %s)", version, old)
        return True
