"""Prometheus metrics of the service, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: fine below 10 ms, where a healthy request sits, coarse above.
_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """Requests, latency, degraded answers by reason, cache lookups, the model version, refused artifacts."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "unirec_requests",
            "Rank requests answered, by environment and HTTP status",
            ["environment", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "unirec_request_latency_seconds",
            "Rank request latency in the handler",
            ["environment"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "unirec_degraded",
            "Rank answers that used a fallback, by reason",
            ["environment", "reason"],
            registry=r,
        )
        self.cache = Counter(
            "unirec_cache_lookups", "Score cache lookups", ["environment", "result"], registry=r
        )
        self.rejected = Counter(
            "unirec_rejected",
            "Requests refused before scoring, by reason",
            ["environment", "reason"],
            registry=r,
        )
        self.model = Gauge("unirec_model_info", "1 for the model version in service", ["version"], registry=r)
        self.swaps = Counter("unirec_model_swaps", "New model versions put into service", registry=r)
        self.refused = Counter(
            "unirec_artifact_refused",
            "Artifact versions refused (verification or warm-up)",
            ["version"],
            registry=r,
        )

    def serving(self, old: str | None, new: str) -> None:
        if old is not None:
            self.model.remove(old)
            self.swaps.inc()
        self.model.labels(new).set(1)
