"""Typed schema of ``python -m unirec.serve``: the server and one block of knobs per environment.

Defaults and their documentation live here only; ``conf/serve.yaml`` and ``conf/serve/<environment>.yaml``
override them. ``serve=home`` hosts one environment, ``serve=[home,search]`` several in one process (the
combined mode), mirroring ``task=[...]`` in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Dict, List, Optional, Sequence


class Fallback(str, Enum):
    """What a degraded request (timeout, scorer error, non-finite scores) answers."""

    popularity = "popularity"
    """Candidates ranked by their train engagements in the task (scores: engagement share)."""
    given_order = "given_order"
    """Candidates in the order the caller gave them (scores: null)."""
    error = "error"
    """No ranking: 503 (or 504 on timeout) with the degraded block, for callers with their own fallback."""


class HistorySource(str, Enum):
    """Where a request's history (the ``sequence`` context field of the user's engagements) comes from."""

    request = "request"
    """``context.history`` as the caller sends it (ids, most recent last)."""
    snapshot = "snapshot"
    """The history of the request's user exported with the artifact (as of the export); the request's is ignored."""
    merge = "merge"
    """The snapshot, then the request's own ids as the most recent."""


@dataclass
class CacheConfig:
    """Score cache keyed by (model version, task, context, candidates)."""

    size: int = 10_000
    """Entries kept (least recently used go first); 0 disables the cache."""
    ttl_s: float = 60.0
    """Seconds an entry stays valid."""
    max_bytes: int = 16 * 2**20
    """Most bytes the entries (their keys: context and candidate ids; and scores) may hold together;
    least recently used go first. Bounds memory whatever callers send, as ``size`` alone does not."""


@dataclass
class EnvironmentConfig:
    """One deployment of the artifact for one use case."""

    task: str = "???"
    """The task (head) this environment ranks for."""
    timeout_ms: float = 100.0
    """Default time budget of scoring; past it the fallback answers (requests may ask for less or more)."""
    fallback: Fallback = Fallback.popularity
    """Default fallback (requests may override it)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    threads: int = 2
    """Scoring worker threads (each request's scoring runs on one; torch intra-op threads: server.torch_threads)."""
    batch_window_ms: float = 0.0
    """Micro-batching: the longest a request waits for concurrent requests of its task to share its forward
    pass (each keeps its own timeout and fallback); 0 scores every request on its own."""
    max_batch: int = 16
    """Micro-batching: requests merged into one forward pass at most; a batch this full starts at once."""
    max_concurrent: int = 32
    """Requests in flight beyond which a new one gets 503 with Retry-After at once."""
    retry_after_s: int = 1
    """Retry-After header of the 503 answered beyond max_concurrent."""
    max_candidates: int = 1000
    """Most candidates a request may send or ask a source for (more: 422 naming the field)."""
    default_top_k: int = 100
    """Candidates returned when the request gives no top_k."""
    exclude_seen: bool = True
    """Drop candidates listed in the request's ``seen`` (items the user has already seen)."""
    candidate_types: List[str] = field(default_factory=list)
    """Candidate types this environment accepts; empty: the task's own type only."""
    history: HistorySource = HistorySource.request
    """Where the history comes from, for a model trained with data.history: request, snapshot or merge."""


@dataclass
class ServerConfig:
    """The process: where it listens, where models come from, and request limits."""

    registry: str = "???"
    """Model registry directory (``python -m unirec.export ... --registry``)."""
    version: Optional[str] = None
    """Pin one version (e.g. v000003); null serves the newest and follows new ones."""
    freshness_s: float = 30.0
    """Seconds between registry polls for a newer version; 0 disables polling."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 1_048_576
    """Largest request body; a larger one gets 413 before it is read."""
    header_timeout_s: float = 10.0
    """Seconds a connection has, from its opening or its previous answer (plus keep_alive_s), to send a
    complete request head; then it is closed (idle and half-sent connections do not pile up)."""
    body_timeout_s: float = 30.0
    """Seconds a request has, from its head, to send its whole body; then the connection is closed."""
    keep_alive_s: float = 5.0
    """Seconds an idle keep-alive connection stays open after an answer (uvicorn's timeout_keep_alive)."""
    max_connections: int = 1000
    """Open connections at most; past it a new one closes the oldest idle one, or gets 503 if none is idle.
    Keep it under the process's file descriptor limit (ulimit -n)."""
    max_head_bytes: int = 65_536
    """Largest request head (request line and headers); a larger one gets 431."""
    torch_threads: int = 1
    """torch intra-op threads (requests are parallel across scoring threads instead)."""
    keep_freed_memory: bool = True
    """Raise glibc's mmap and trim thresholds so freed activations are reused, not page-faulted in afresh on
    every request (:mod:`unirec.memory`); the process then keeps its peak working set."""
    log_level: str = "warning"


@dataclass
class ServeConfig:
    """Root of ``python -m unirec.serve``'s composed configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    serve: Dict[str, EnvironmentConfig] = field(default_factory=dict)
    """Environment name -> its knobs (the ``serve`` config group; one file per environment)."""


def register_serve_configs() -> None:
    """Register the schema so ``conf/serve.yaml`` (``defaults: [serve_schema, ...]``) is validated."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def compose_serve(overrides: Sequence[str] = ()) -> ServeConfig:
    """The typed config exactly as ``python -m unirec.serve <overrides>`` builds it (for scripts and tests)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from unirec.config import conf_dir

    register_serve_configs()
    with initialize_config_dir(config_dir=conf_dir(), version_base=None):
        cfg = OmegaConf.to_object(compose("serve", overrides=list(overrides)))
    assert isinstance(cfg, ServeConfig)
    return cfg


def check(cfg: ServeConfig) -> None:
    """Fail at start, naming the key, on what the types cannot say."""
    if not cfg.serve:
        raise ValueError(
            "no environment selected: choose one or more, e.g. serve=home or serve=[home,search]"
        )
    for name, env in cfg.serve.items():
        for key in (
            "timeout_ms",
            "threads",
            "max_concurrent",
            "max_candidates",
            "default_top_k",
            "max_batch",
        ):
            if getattr(env, key) <= 0:
                raise ValueError(f"serve.{name}.{key} must be > 0, got {getattr(env, key)}")
        if env.batch_window_ms < 0:
            raise ValueError(
                f"serve.{name}.batch_window_ms must be >= 0 (0: no micro-batching), got {env.batch_window_ms}"
            )
    for key in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_connections", "max_head_bytes"):
        if getattr(cfg.server, key) <= 0:
            raise ValueError(f"server.{key} must be > 0, got {getattr(cfg.server, key)}")
