"""Is a Celery worker running? A heartbeat in Redis that workers write and servers read.

Every worker adds itself to the sorted set ``{prefix}:workers`` (member: its Celery node
name, score: the *Redis server's* time of its last beat, so machines with skewed clocks
agree) every HEARTBEAT_PERIOD_S, and stores that time in ``{prefix}:workers:last_seen``. A
node is alive while its last beat is at most HEARTBEAT_TTL_S old. A worker that stops
cleanly removes itself, and so does ``quark up`` for a worker it saw die: the outage shows at
once instead of after the TTL. A worker killed elsewhere turns "down" after the TTL.

Servers read it off the request path: :class:`WorkerMonitor` polls every MONITOR_POLL_S with
a short timeout and keeps the answer, so ``/readyz`` never waits on Redis; while Redis does
not answer the state is "unknown".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis

from quark.service.keys import RedisKeys
from quark.service.redis_client import connect

log = logging.getLogger(__name__)

HEARTBEAT_PERIOD_S = 2.0
HEARTBEAT_TTL_S = 3 * HEARTBEAT_PERIOD_S
FORGET_AFTER_S = 86_400.0  # nodes silent this long leave the set (bounds it)
MONITOR_POLL_S = 1.0
MONITOR_TIMEOUT_S = 0.5  # connect/read timeout of a server's poll

State = Literal["up", "down", "unknown"]


@dataclass(frozen=True)
class WorkerStatus:
    state: State
    last_seen: float | None = None  # unix time (Redis clock) of the newest heartbeat
    alive: int = 0  # workers with a fresh heartbeat

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "last_seen": self.last_seen, "alive": self.alive}


def _redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def beat(client: redis.Redis, keys: RedisKeys, node: str) -> float:
    """Record one heartbeat of ``node``; returns its time (Redis clock)."""
    now = _redis_now(client)
    pipe = client.pipeline(transaction=True)
    pipe.zadd(keys.workers, {node: now})
    pipe.zremrangebyscore(keys.workers, "-inf", now - FORGET_AFTER_S)
    pipe.set(keys.workers_last_seen, repr(now))
    pipe.execute()
    return now


def forget(client: redis.Redis, keys: RedisKeys, node: str) -> None:
    """``node`` is gone (stopped, or seen dead): it no longer counts as alive."""
    client.zrem(keys.workers, node)


def read_status(
    client: redis.Redis, keys: RedisKeys, ttl_s: float = HEARTBEAT_TTL_S
) -> WorkerStatus:
    """One read (raises redis.RedisError when Redis does not answer)."""
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.zrange(keys.workers, 0, -1, withscores=True)
    pipe.get(keys.workers_last_seen)
    (seconds, micros), members, last_seen = pipe.execute()
    now = float(seconds) + micros / 1e6
    alive = sum(1 for _, at in members if now - float(at) <= ttl_s)
    return WorkerStatus(
        "up" if alive else "down", float(last_seen) if last_seen is not None else None, alive
    )


def forget_quietly(url: str, prefix: str, node: str) -> None:
    """:func:`forget`, best effort within about a second (for ``quark up``)."""
    try:
        forget(connect(url, read_timeout_s=1.0), RedisKeys(prefix), node)
    except (redis.RedisError, ValueError) as exc:
        log.warning("could not mark worker %s down in Redis: %s", node, exc)


class Heartbeat:
    """A worker's heartbeat thread: ``start(node)`` once the worker is ready, ``stop()``
    when it shuts down (removes the node). Redis errors are logged and retried."""

    def __init__(self, url: str, prefix: str, period_s: float = HEARTBEAT_PERIOD_S) -> None:
        self.client = connect(url, read_timeout_s=max(1.0, period_s))
        self.keys = RedisKeys(prefix)
        self.period_s = period_s
        self.node: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, node: str) -> None:
        if self._thread is not None:
            return
        self.node = node
        self._thread = threading.Thread(target=self._run, name="worker-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None or self.node is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        try:
            forget(self.client, self.keys, self.node)
        except redis.RedisError as exc:
            log.warning("could not remove this worker's heartbeat: %s", exc)

    def _run(self) -> None:
        assert self.node is not None
        failing = False
        while not self._stop.is_set():
            try:
                beat(self.client, self.keys, self.node)
                if failing:
                    log.info("worker heartbeat: Redis answers again")
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("worker heartbeat: Redis unreachable (%s); retrying", exc)
                failing = True
            self._stop.wait(self.period_s)


class WorkerMonitor:
    """A server's view of the workers, refreshed by a thread; ``status()`` never blocks.

    ``on_update`` gets every fresh status (the metrics); state changes are logged.
    """

    def __init__(
        self,
        url: str,
        prefix: str,
        on_update: Callable[[WorkerStatus], None] | None = None,
        poll_s: float = MONITOR_POLL_S,
        timeout_s: float = MONITOR_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.keys = RedisKeys(prefix)
        self.on_update = on_update
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._status = WorkerStatus("unknown")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-monitor", daemon=True)

    def status(self) -> WorkerStatus:
        return self._status

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def poll(self, client: redis.Redis) -> WorkerStatus:
        """One refresh (the thread's body; tests call it directly)."""
        previous = self._status
        try:
            status = read_status(client, self.keys)
        except redis.RedisError:
            status = WorkerStatus("unknown", previous.last_seen)
        if status.state != previous.state:
            level = logging.INFO if status.state == "up" else logging.WARNING
            log.log(level, "Celery worker state: %s -> %s", previous.state, status.state)
        self._status = status
        if self.on_update is not None:
            self.on_update(status)
        return status

    def _run(self) -> None:
        client = connect(self.url, read_timeout_s=self.timeout_s)
        while not self._stop.is_set():
            self.poll(client)
            self._stop.wait(self.poll_s)
