"""The one way the service opens a Redis client, with one timeout policy."""

from __future__ import annotations

import redis

#: Connect timeout: an unreachable Redis is reported within this, never hangs a caller.
CONNECT_TIMEOUT_S = 2.0
#: Read timeout of ordinary commands; callers that block on purpose (pub/sub) pass their own.
READ_TIMEOUT_S = 10.0
HEALTH_CHECK_S = 30


def connect(url: str, read_timeout_s: float | None = READ_TIMEOUT_S) -> redis.Redis:
    """A client for ``url``: connect within CONNECT_TIMEOUT_S, reads within ``read_timeout_s``,
    idle connections checked every HEALTH_CHECK_S before use."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=min(CONNECT_TIMEOUT_S, read_timeout_s or CONNECT_TIMEOUT_S),
        socket_timeout=read_timeout_s,
        health_check_interval=HEALTH_CHECK_S,
    )


def answers(url: str) -> bool:
    """True if a Redis answers PING at ``url`` now."""
    try:
        return bool(connect(url, read_timeout_s=1.0).ping())
    except (redis.RedisError, ValueError):
        return False
