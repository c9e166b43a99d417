"""The worker heartbeat (real Redis) and how the API shows it: /readyz and /metrics, fast
even when Redis does not answer."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from app.main import create_app
from quark.service.keys import RedisKeys
from quark.service.redis_client import connect
from quark.service.settings import ServiceSettings
from quark.service.worker_status import (
    MONITOR_POLL_S,
    Heartbeat,
    WorkerMonitor,
    WorkerStatus,
    beat,
    forget,
    read_status,
)
from testkit.stack import drop_keys, wait_for
from tests.conftest import REDIS_URL

HUNG_S = 20.0  # how long a poll of the hung Redis blocks in the test below


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    name = f"qs-worker-{uuid.uuid4().hex[:8]}"
    yield name
    drop_keys(redis_client, name)


def test_a_heartbeat_is_up_until_it_is_too_old_or_forgotten(
    redis_client: redis.Redis, prefix: str
) -> None:
    keys = RedisKeys(prefix)
    assert read_status(redis_client, keys) == WorkerStatus("down", None, 0)  # never seen
    at = beat(redis_client, keys, "w1@host")
    beat(redis_client, keys, "w2@host")
    status = read_status(redis_client, keys)
    assert status.state == "up" and status.alive == 2
    assert status.last_seen is not None and status.last_seen >= at
    time.sleep(0.3)
    old = read_status(redis_client, keys, ttl_s=0.2)  # no beat for longer than the TTL
    assert old.state == "down" and old.alive == 0 and old.last_seen == status.last_seen
    forget(redis_client, keys, "w1@host")
    assert read_status(redis_client, keys).alive == 1
    forget(redis_client, keys, "w2@host")
    gone = read_status(redis_client, keys)
    assert gone.state == "down" and gone.last_seen == status.last_seen  # still says when


def test_the_heartbeat_thread_beats_and_removes_itself(
    redis_client: redis.Redis, prefix: str
) -> None:
    keys = RedisKeys(prefix)
    heartbeat = Heartbeat(REDIS_URL, prefix, period_s=0.1)
    heartbeat.start("w@host")
    try:
        wait_for(lambda: read_status(redis_client, keys).state == "up", 5, "a heartbeat")
        first = read_status(redis_client, keys).last_seen
        wait_for(lambda: read_status(redis_client, keys).last_seen != first, 5, "another")
    finally:
        heartbeat.stop()
    assert read_status(redis_client, keys).state == "down"  # a clean stop shows at once


def _blackhole() -> socket.socket:
    """A port that accepts connections and never answers (a hung Redis)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_the_monitor_says_unknown_when_redis_does_not_answer() -> None:
    seen: list[WorkerStatus] = []
    with _blackhole() as hung:
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        monitor = WorkerMonitor(url, "qs-none", on_update=seen.append, timeout_s=0.2)
        started = time.monotonic()
        status = monitor.poll(connect(url, read_timeout_s=0.2))
        assert time.monotonic() - started < 2
    assert status.state == "unknown" and seen == [status]


def _app(model: Path, data_dir: Path, redis_url: str, prefix: str) -> TestClient:
    settings = ServiceSettings(
        model=str(model),
        data_dir=data_dir,
        redis_url=redis_url,
        key_prefix=prefix,
        admin_token="t",
        watch_versions=False,
        torch_threads=1,
        redis_retry_s=0.2,
    )
    return TestClient(create_app(settings))


def _metric(client: TestClient, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", client.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def _readyz(client: TestClient) -> httpx.Response:
    return client.get("/readyz")


def test_readyz_and_metrics_show_the_worker(
    tiny_model_dir: Path, tmp_path: Path, redis_client: redis.Redis, prefix: str
) -> None:
    keys = RedisKeys(prefix)
    with _app(tiny_model_dir, tmp_path, REDIS_URL, prefix) as client:
        wait_for(lambda: _readyz(client).status_code == 200, 60, "the model to load")
        wait_for(lambda: _readyz(client).json()["worker"]["state"] == "down", 10, "down")
        assert _metric(client, "quark_worker_up") == 0
        at = beat(redis_client, keys, "w@host")
        wait_for(lambda: _readyz(client).json()["worker"]["state"] == "up", 10, "up")
        body = _readyz(client).json()
        assert body["status"] == "ready" and body["worker"]["alive"] == 1
        assert body["worker"]["last_seen"] == pytest.approx(at)
        assert _metric(client, "quark_worker_up") == 1
        assert _metric(client, "quark_worker_last_seen_timestamp_seconds") == pytest.approx(at)
        forget(redis_client, keys, "w@host")  # what `quark up` does when its worker dies
        wait_for(lambda: _readyz(client).json()["worker"]["state"] == "down", 10, "down")
        response = _readyz(client)
        assert response.status_code == 200  # generation does not need a worker
        assert _metric(client, "quark_worker_up") == 0


def test_readyz_answers_at_once_while_redis_hangs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The monitor's poll of the hung Redis now blocks for HUNG_S: a /readyz that waited on
    # Redis would take that long. The bound below is far from both, so load cannot flip it.
    monkeypatch.setattr(WorkerMonitor.__init__, "__defaults__", (None, MONITOR_POLL_S, HUNG_S))
    with _blackhole() as hung:
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        with _app(tiny_model_dir, tmp_path, url, "qs-hung") as client:
            wait_for(lambda: _readyz(client).status_code == 200, 60, "the model to load")
            for _ in range(10):
                started = time.monotonic()
                response = _readyz(client)
                assert time.monotonic() - started < HUNG_S / 4
                assert response.status_code == 200  # the spool takes the pool records
                assert response.json()["worker"]["state"] == "unknown"
                time.sleep(0.1)
            assert _metric(client, "quark_worker_up") == 0
