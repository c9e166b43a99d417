"""Prometheus metrics of one app, in its own registry (several apps can share a process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Latency buckets from 10 ms (a tiny model's short completion) to 2 min (long CPU generations).
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """Every metric the service exports; names are prefixed ``quark_``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "quark_requests",
            "HTTP requests by route and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "quark_request_latency_seconds",
            "Time from request to the end of its response",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "quark_time_to_first_token_seconds",
            "Time from request to its first generated token",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.generated_tokens = Counter(
            "quark_generated_tokens", "Completion tokens generated", registry=r
        )
        self.batch_size = Histogram(
            "quark_batch_size", "Rows in each decode step", buckets=_BATCH, registry=r
        )
        self.queue_depth = Gauge(
            "quark_queue_depth", "Completions waiting to join the decode batch", registry=r
        )
        self.active_rows = Gauge("quark_active_rows", "Completions being decoded", registry=r)
        self.model_info = Gauge(
            "quark_model_version_info", "Active model version (value 1)", ["version"], registry=r
        )
        self.model_fallback = Gauge(
            "quark_model_fallback",
            "1 while this server does not serve the active version because it failed "
            "verification or loading (it serves a verified ancestor, or keeps its version)",
            registry=r,
        )
        self.pool_writes = Counter(
            "quark_pool_writes",
            "Pool records written to Redis (spool replays included)",
            registry=r,
        )
        self.pool_spooled = Counter(
            "quark_pool_spooled", "Pool records written to the on-disk spool", registry=r
        )
        self.spool_records = Gauge(
            "quark_spool_records", "Pool records in the on-disk spool", registry=r
        )
        self.pool_dropped = Counter(
            "quark_pool_dropped_records",
            "Pool records lost: spool or memory buffer full",
            ["reason"],
            registry=r,
        )
        self.redis_up = Gauge(
            "quark_pool_redis_up", "1 when the pool writer reached Redis last time", registry=r
        )
        self.worker_up = Gauge(
            "quark_worker_up",
            "1 while a Celery worker's heartbeat is fresh in Redis; 0 when none is, or Redis "
            "does not answer (see quark_pool_redis_up)",
            registry=r,
        )
        self.worker_last_seen = Gauge(
            "quark_worker_last_seen_timestamp_seconds",
            "Unix time of the newest worker heartbeat (0: never seen)",
            registry=r,
        )
        self._version: str | None = None

    def set_model_version(self, version: str) -> None:
        if self._version is not None:
            self.model_info.remove(self._version)
        self.model_info.labels(version=version).set(1)
        self._version = version

    def set_worker_status(self, up: bool, last_seen: float | None) -> None:
        self.worker_up.set(1 if up else 0)
        if last_seen is not None:
            self.worker_last_seen.set(last_seen)

    def render(self) -> bytes:
        return generate_latest(self.registry)
