"""Every Redis key and channel of the service, named once (``prefix`` = ``QUARK_KEY_PREFIX``).

| key                              | type      | what |
|----------------------------------|-----------|---------------------------------------------------|
| ``{prefix}:pool``                | stream    | pool records (``record`` = PoolRecord JSON) |
| ``{prefix}:rewards``             | hash      | record_id -> reward |
| ``{prefix}:cursors``             | hash      | consumer name -> last stream id processed |
| ``{prefix}:active_version``      | string    | the model version every server should serve |
| ``{prefix}:versions``            | channel   | announces every activation |
| ``{prefix}:config:logging_enabled`` | string | the privacy switch ("0"/"1") |
| ``{prefix}:lock:{name}``         | lock      | bootstrap, score, unlearn |
| ``{prefix}:jobs``                | zset      | job_id -> creation time |
| ``{prefix}:job:{id}``            | hash      | trigger, overrides, progress, result |
| ``{prefix}:job:{id}:cancel``     | string    | set when an admin cancels the job |
| ``{prefix}:job:{id}:alive``      | string    | expires unless the running job renews it |
| ``{prefix}:unlearn:queued``      | string    | a continuous-mode job is queued |
| ``{prefix}:unlearn:last``        | hash      | at, scored: when continuous mode last started one |
| ``{prefix}:workers``             | zset      | Celery node -> Redis time of its last heartbeat |
| ``{prefix}:workers:last_seen``   | string    | Redis time of the newest worker heartbeat |
| ``{prefix}:celery:*``            | (Celery)  | broker queues and task results |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    prefix: str

    @property
    def pool(self) -> str:
        return f"{self.prefix}:pool"

    @property
    def rewards(self) -> str:
        return f"{self.prefix}:rewards"

    @property
    def cursors(self) -> str:
        return f"{self.prefix}:cursors"

    @property
    def active_version(self) -> str:
        return f"{self.prefix}:active_version"

    @property
    def versions_channel(self) -> str:
        return f"{self.prefix}:versions"

    @property
    def logging_switch(self) -> str:
        return f"{self.prefix}:config:logging_enabled"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    def job(self, job_id: str, suffix: str = "") -> str:
        return f"{self.prefix}:job:{job_id}{suffix}"

    @property
    def continuous_queued(self) -> str:
        return f"{self.prefix}:unlearn:queued"

    def aux_queued(self, version: str) -> str:
        """Set while the parallel scheme's aux job for ``version`` is queued or running."""
        return f"{self.prefix}:aux:queued:{version}"

    @property
    def continuous_last(self) -> str:
        return f"{self.prefix}:unlearn:last"

    @property
    def workers(self) -> str:
        """Worker heartbeats (quark.service.worker_status)."""
        return f"{self.prefix}:workers"

    @property
    def workers_last_seen(self) -> str:
        return f"{self.prefix}:workers:last_seen"

    @property
    def celery(self) -> str:
        """Prefix of Celery's broker and result keys."""
        return f"{self.prefix}:celery:"

    @property
    def all(self) -> str:
        """A SCAN pattern matching every key of this prefix."""
        return f"{self.prefix}:*"
