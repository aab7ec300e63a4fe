"""The model in service, and the registry poller that hot-swaps newer versions in.

A new version is verified (every hash), loaded and warmed up (the catalogue encoded, one request per task,
finite scores) on the poller's thread while the old one keeps serving; only then does one attribute
assignment put it into service. A request holds the scorer it started with, so none is dropped mid-swap.
A version that fails any step (any error at all: a version's files are untrusted input) is refused, counted
and remembered with the fingerprint of its files (name, size, mtime), so it is not retried on every poll but
is retried once its files change (a version seen half-copied, then complete). The old one keeps serving and
the service stays ready. A version's name is its directory's: a manifest that claims another is refused.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from unirec.export import ArtifactError, versions
from unirec.serve.scorer import Scorer

log = logging.getLogger("unirec.serve")

# A check of a loaded scorer against the API in service: None when compatible, else the reason.
Compatibility = Callable[[Scorer], Optional[str]]
# (relative name, size, mtime in ns) of every entry under a version directory, sorted.
Fingerprint = Tuple[Tuple[str, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What changes when a version's files do: each entry's name, size and mtime (links not followed)."""
    out = []
    for root, dirs, names in os.walk(path, followlinks=False):
        for n in [*dirs, *names]:
            try:
                st = os.lstat(os.path.join(root, n))
            except OSError:  # removed while we walk: the next poll sees the change
                continue
            out.append((os.path.relpath(os.path.join(root, n), path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


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
        """Version -> why it was refused (paths relative to the registry)."""
        self._refused_files: Dict[str, Fingerprint] = {}
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
            newer = [v for v in versions(self.registry) if self.version is None or v > self.version]
            for version in reversed(newer):
                if not self._refused_unchanged(version):
                    return version if self._try(version) else None
            return None

    def _refused_unchanged(self, version: str) -> bool:
        """Refused before, and its files are as they were then (so it would be refused again)."""
        seen = self._refused_files.get(version)
        return seen is not None and seen == fingerprint(self.registry / version)

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
        # Taken before loading: a file that changes while we load makes the next poll try again.
        files = fingerprint(path)
        try:
            scorer = Scorer.load(path)
            if scorer.version != version:
                raise ArtifactError(
                    f"{path}: its manifest names version {scorer.version!r}; a version is its directory's "
                    "name (publish with python -m unirec.export, never copy a version under a new name)"
                )
            reason = self.compatible(scorer)
            if reason:
                raise ArtifactError(f"{path}: {reason}")
        # Every file of a version is untrusted input, and any error reading one (a TypeError from a spec
        # with a key too many as much as a hash mismatch) means the same thing: refuse it, keep serving.
        except Exception as e:  # noqa: BLE001
            reason = self._relative(
                f"{type(e).__name__}: {e}" if not isinstance(e, ArtifactError) else str(e)
            )
            self.refused[version], self._refused_files[version] = reason, files
            log.error("refused model version %s: %s", version, reason)
            self._on_refuse(version, reason)
            return False
        old = self.version
        self.scorer = scorer
        self.refused.pop(version, None)
        self._refused_files.pop(version, None)
        self._on_swap(old, version)
        log.warning("serving model version %s (was %s)", version, old)
        return True

    def _relative(self, reason: str) -> str:
        """The reason with the registry's own location left out: it is answered on /v1/metadata."""
        for root in {str(self.registry.resolve()), str(self.registry.absolute()), str(self.registry)}:
            reason = reason.replace(root + os.sep, "")
        return reason
