"""Logs every completion to the Redis pool without ever failing or slowing a request.

``log()`` only puts the record on an in-memory queue (bounded: ``pool_buffer_records``).
One writer thread drains it: straight to the Redis stream while Redis answers, otherwise
(and while older records still wait on disk, so order is kept) into the on-disk
:class:`~app.spool.Spool`. Every ``redis_retry_s`` the thread checks Redis, replays the
spool oldest first, and re-reads the shared logging switch. Records are lost only when
the memory buffer or the spool bound is full; each loss is counted and logged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import redis

from app.metrics import Metrics
from app.spool import Spool
from quark.pool import PoolRecord
from quark.service.keys import RedisKeys
from quark.service.redis_pool import RedisPool
from quark.service.settings import ServiceSettings

log = logging.getLogger(__name__)

_CHUNK = 256  # records per Redis round trip


class PoolLogger:
    """Background pool writer with an on-disk fallback; see the module docstring."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.pool = RedisPool.from_url(
            settings.redis_url,
            settings.key_prefix,
            settings.pool_max_records,
            timeout_s=settings.redis_timeout_s,
        )
        self.switch_key = RedisKeys(settings.key_prefix).logging_switch
        self.spool = Spool(
            settings.spool_dir, settings.spool_max_records, settings.spool_segment_records
        )
        self._queue: queue.Queue[str] = queue.Queue(maxsize=settings.pool_buffer_records)
        self._enabled = settings.logging_enabled
        self._switch_dirty = False  # set locally, not yet stored in Redis
        self._switch_lock = threading.Lock()
        self.redis_up = False
        self._stop = threading.Event()
        self._idle = threading.Event()  # the queue is drained (for flush())
        self._thread = threading.Thread(target=self._run, name="pool-writer", daemon=True)
        self._last_drop_log = 0.0
        metrics.spool_records.set(len(self.spool))

    # -- called from request handlers ------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def switch_pending(self) -> bool:
        """The switch was set here but not yet stored in Redis."""
        return self._switch_dirty

    def log(self, record: PoolRecord) -> None:
        """Queue a record for the pool; never blocks and never raises for a full buffer."""
        try:
            self._queue.put_nowait(record.to_json())
            self._idle.clear()
        except queue.Full:
            self._dropped("buffer_full", 1)

    def set_enabled(self, enabled: bool) -> bool:
        """Flip the switch here and in Redis (for every replica); returns whether Redis
        has it now. If not, this replica applies it anyway and stores it when Redis is back.
        Blocking (a Redis call): run it in a thread."""
        with self._switch_lock:
            self._enabled = enabled
            self._switch_dirty = True
        return self._push_switch()

    def status(self) -> dict[str, Any]:
        return {
            "redis": "up" if self.redis_up else "down",
            "spool_records": len(self.spool),
            "spool_writable": self.spool.writable(),
            "buffered": self._queue.qsize(),
            "logging_enabled": self._enabled,
        }

    def ready(self) -> bool:
        """Records can go somewhere: Redis answers, or the spool takes them."""
        return self.redis_up or self.spool.writable()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Drain the memory buffer (to Redis or the spool), then stop the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued records have been written to Redis or the spool (tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05):
                return True
        return False

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        next_check = 0.0
        while not (self._stop.is_set() and self._queue.empty()):
            if time.monotonic() >= next_check:
                self._housekeeping()
                next_check = time.monotonic() + self.settings.redis_retry_s
            batch = self._take(timeout=min(0.2, max(0.0, next_check - time.monotonic())))
            if batch:
                self._write(batch)
            if self._queue.empty():
                self._idle.set()

    def _take(self, timeout: float) -> list[str]:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < _CHUNK:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, lines: list[str]) -> None:
        # While older records wait on disk, newer ones queue behind them to keep order.
        if self.redis_up and not len(self.spool):
            try:
                self.pool.add_json(lines)
                self.metrics.pool_writes.inc(len(lines))
                return
            except redis.RedisError as exc:
                self._mark_down(exc)
        self._to_spool(lines)

    def _to_spool(self, lines: list[str]) -> None:
        try:
            accepted = self.spool.append(lines)
        except OSError as exc:
            log.error("pool spool %s is not writable: %s", self.spool.directory, exc)
            accepted = 0
        self.metrics.pool_spooled.inc(accepted)
        self.metrics.spool_records.set(len(self.spool))
        if accepted < len(lines):
            self._dropped("spool_full", len(lines) - accepted)

    def _housekeeping(self) -> None:
        """Check Redis, replay the spool, share the logging switch."""
        try:
            self.pool.ping()
            if not self.redis_up:
                log.info("pool: Redis at %s answers again", self.settings.redis_url)
            self.redis_up = True
            self._replay()
            self._push_switch()
            self._pull_switch()
        except redis.RedisError as exc:
            self._mark_down(exc)
        self.metrics.redis_up.set(1 if self.redis_up else 0)

    def _replay(self) -> None:
        while lines := self.spool.peek(_CHUNK):
            self.pool.add_json(lines)  # all or nothing (MULTI/EXEC)
            self.spool.commit(len(lines))
            self.metrics.pool_writes.inc(len(lines))
            self.metrics.spool_records.set(len(self.spool))

    def _push_switch(self) -> bool:
        with self._switch_lock:
            dirty, value = self._switch_dirty, self._enabled
        if not dirty:
            return True
        try:
            self.pool.client.set(self.switch_key, "1" if value else "0")
        except redis.RedisError as exc:
            log.warning("logging switch kept locally until Redis answers: %s", exc)
            return False
        with self._switch_lock:
            if self._enabled == value:
                self._switch_dirty = False
        return True

    def _pull_switch(self) -> None:
        raw = self.pool.client.get(self.switch_key)
        with self._switch_lock:
            if not self._switch_dirty:
                self._enabled = self.settings.logging_enabled if raw is None else raw == b"1"

    def _mark_down(self, exc: Exception) -> None:
        if self.redis_up:
            log.warning("pool: Redis unreachable (%s); spooling to %s", exc, self.spool.directory)
        self.redis_up = False
        self.metrics.redis_up.set(0)

    def _dropped(self, reason: str, count: int) -> None:
        self.metrics.pool_dropped.labels(reason=reason).inc(count)
        now = time.monotonic()
        if now - self._last_drop_log > 5:  # a flood of drops must not flood the log too
            self._last_drop_log = now
            log.error(
                "pool: dropped %d record(s) (%s); see quark_pool_dropped_records", count, reason
            )
