"""Bookkeeping of unlearn jobs in Redis, shared by the admin API and the workers.

Celery's result backend keeps each job's state and progress; this adds what it lacks:
an index to list jobs, cancel flags the training loop polls, a liveness heartbeat (a job
whose worker died stops renewing it), the attempt that is running (a worker sets it when an
attempt starts and clears it however the attempt ends, so a marker left behind with no
heartbeat means the worker died mid-job), and continuous mode's "last job" marker.

A job's ``result`` here is its fate: once recorded, a re-delivered message changes nothing.

Key names: :mod:`quark.service.keys`.
"""

from __future__ import annotations

import json
import time
from typing import Any

from quark.service.keys import RedisKeys

DAY_S = 24 * 3600
MAX_JOBS_KEPT = 1000


class JobLost(RuntimeError):
    """The job's worker died during an attempt: the job is recorded failed, never re-run.

    Torch-free, so the API can rebuild it from Celery's result backend."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobRegistry:
    """See the module docstring; ``client`` is a redis.Redis."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.keys = RedisKeys(prefix)
        self.index_key = self.keys.jobs
        self.queued_key = self.keys.continuous_queued
        self.last_key = self.keys.continuous_last

    def _key(self, job_id: str, suffix: str = "") -> str:
        return self.keys.job(job_id, suffix)

    # -- index -----------------------------------------------------------------------------
    def register(self, job_id: str, trigger: str, overrides: dict[str, Any]) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self._key(job_id),
            mapping={"created": now, "trigger": trigger, "overrides": json.dumps(overrides)},
        )
        pipe.zadd(self.index_key, {job_id: now})
        # Keep the index bounded: drop the oldest entries beyond MAX_JOBS_KEPT.
        pipe.zremrangebyrank(self.index_key, 0, -MAX_JOBS_KEPT - 1)
        pipe.execute()

    def job_ids(self, limit: int = 50) -> list[str]:
        """Newest first."""
        return [_text(i) for i in self.client.zrevrange(self.index_key, 0, limit - 1)]

    def info(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.hgetall(self._key(job_id))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        info: dict[str, Any] = {
            "created": float(fields.get("created", 0.0)),
            "trigger": fields.get("trigger", ""),
            "overrides": json.loads(fields.get("overrides", "{}")),
        }
        for name in ("result", "progress"):
            if name in fields:
                info[name] = json.loads(fields[name])
        return info

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        self.client.hset(self._key(job_id), "progress", json.dumps(progress, default=str))

    def set_result(self, job_id: str, result: dict[str, Any]) -> None:
        self.client.hset(self._key(job_id), "result", json.dumps(result, default=str))

    # -- cancellation and liveness -----------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        self.client.set(self._key(job_id, ":cancel"), "1", ex=7 * DAY_S)

    def cancelled(self, job_id: str) -> bool:
        return bool(self.client.exists(self._key(job_id, ":cancel")))

    def heartbeat(self, job_id: str, ttl_s: float) -> None:
        self.client.set(self._key(job_id, ":alive"), "1", px=int(ttl_s * 1000))

    def alive(self, job_id: str) -> bool:
        return bool(self.client.exists(self._key(job_id, ":alive")))

    def clear_heartbeat(self, job_id: str) -> None:
        self.client.delete(self._key(job_id, ":alive"))

    # -- attempts ----------------------------------------------------------------------------
    def claim_attempt(self, job_id: str, attempt: int, ttl_s: float) -> int | None:
        """Mark ``attempt`` (1 = first delivery, 2 = first retry, ...) as the running one and
        start its heartbeat; returns None then. If an attempt is already marked (running
        elsewhere, or its worker died before clearing it), returns that attempt's number."""
        key = self._key(job_id)
        for _ in range(3):  # the marker may be cleared between the two commands
            if self.client.hsetnx(key, "running", attempt):
                self.heartbeat(job_id, ttl_s)
                return None
            marked = self.client.hget(key, "running")
            if marked is not None:
                return int(_text(marked))
        raise RuntimeError(f"job {job_id}: could not claim attempt {attempt}")

    def take_over(self, job_id: str, attempt: int, ttl_s: float) -> None:
        """Mark ``attempt`` as running, replacing an earlier attempt's marker."""
        self.client.hset(self._key(job_id), "running", attempt)
        self.heartbeat(job_id, ttl_s)

    def end_attempt(self, job_id: str) -> None:
        self.client.hdel(self._key(job_id), "running")

    # -- continuous mode -------------------------------------------------------------------
    def mark_queued(self, job_id: str, ttl_s: float) -> bool:
        """True if no continuous job was queued yet (and now ``job_id`` is)."""
        return bool(self.client.set(self.queued_key, job_id, nx=True, px=int(ttl_s * 1000)))

    def clear_queued(self) -> None:
        self.client.delete(self.queued_key)

    def last_job(self) -> tuple[float, int] | None:
        raw = self.client.hgetall(self.last_key)
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        return float(fields["at"]), int(fields["scored"])

    def mark_started(self, scored_total: int, at: float | None = None) -> None:
        at = time.time() if at is None else at
        self.client.hset(self.last_key, mapping={"at": at, "scored": scored_total})
