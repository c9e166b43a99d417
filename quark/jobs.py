"""Bookkeeping of unlearn jobs in Redis, shared by the admin API and the workers.

Celery's result backend keeps each job's state and progress; this adds what it lacks:
an index to list jobs, cancel flags the training loop polls, a liveness heartbeat (a job
whose worker died stops renewing it), and continuous mode's "last job" marker.

Keys (``prefix`` = ``QUARK_KEY_PREFIX``):
  ``{prefix}:jobs``               sorted set job_id -> creation time
  ``{prefix}:job:{id}``           hash: created, trigger, overrides, progress, result (JSON)
  ``{prefix}:job:{id}:cancel``    set when an admin cancels the job
  ``{prefix}:job:{id}:alive``     expires unless the running job renews it
  ``{prefix}:unlearn:queued``     a continuous-mode job is queued (no second one)
  ``{prefix}:unlearn:last``       hash: at (time), scored (scored records then)
"""

from __future__ import annotations

import json
import time
from typing import Any

DAY_S = 24 * 3600
MAX_JOBS_KEPT = 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobRegistry:
    """See the module docstring; ``client`` is a redis.Redis."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.index_key = f"{prefix}:jobs"
        self.queued_key = f"{prefix}:unlearn:queued"
        self.last_key = f"{prefix}:unlearn:last"

    def _key(self, job_id: str, suffix: str = "") -> str:
        return f"{self.prefix}:job:{job_id}{suffix}"

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
