"""What a server that follows the model store serves from the start (issue 9).

Real server processes (tiny model, the real Redis). A fresh server is not ready before it
serves version 0 (it used to answer ready on the raw base model while a worker was still
publishing v0000); a server whose active version fails verification serves the newest
version of its ancestry that verifies and says so (it used to serve the raw base model).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from quark.models import QuarkModel
from quark.service.store import ModelStore, RedisVersionPointer
from quark.service.up import api_argv, free_port
from testkit.env import isolated_env
from tests.conftest import REDIS_URL

from .conftest import ADMIN_TOKEN, REPO, Server, start_server

FOLLOW_STORE = {"QUARK_WATCH_VERSIONS": "1", "QUARK_WATCHER_POLL_S": "1"}


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"qs-store-{uuid.uuid4().hex[:8]}"
    yield prefix
    keys = list(redis_client.scan_iter(f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)


def spawn_server(model: Path, workdir: Path, prefix: str) -> Server:
    """Start a server that follows the store, without waiting for it to be ready."""
    port = free_port()
    env = isolated_env(
        {
            "QUARK_MODEL": str(model),
            "QUARK_REDIS_URL": REDIS_URL,
            "QUARK_KEY_PREFIX": prefix,
            "QUARK_DATA_DIR": str(workdir / "data"),
            "QUARK_ADMIN_TOKEN": ADMIN_TOKEN,
            "QUARK_TORCH_THREADS": "1",
            **FOLLOW_STORE,
        }
    )
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            api_argv("127.0.0.1", port), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Server(f"http://127.0.0.1:{port}", process, log_path, prefix)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_a_fresh_server_is_ready_only_once_it_serves_version_zero(
    tiny_model_dir: Path, tmp_path: Path, prefix: str, redis_client: redis.Redis
) -> None:
    # A worker is publishing v0000 (it holds the bootstrap lock: converting takes a while).
    bootstrap = redis_client.lock(f"{prefix}:lock:bootstrap", timeout=120)
    assert bootstrap.acquire(blocking=False)
    server = spawn_server(tiny_model_dir, tmp_path, prefix)
    try:
        deadline = time.monotonic() + 120
        while (answer := _get(f"{server.url}/healthz")) is None:
            assert server.process.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.2)
        # Long enough for the raw base model to load several times over: still not ready.
        until = time.monotonic() + 8
        while time.monotonic() < until:
            ready = httpx.get(f"{server.url}/readyz", timeout=5)
            assert ready.status_code == 503, ready.text
            assert not ready.json()["model_loaded"] and ready.json().get("serving") is None
            time.sleep(0.2)
        generated = httpx.post(f"{server.url}/generate", json={"prompt": "Hi"}, timeout=10)
        assert generated.status_code == 503, generated.text

        bootstrap.release()  # the worker gave up: the server publishes v0000 itself
        deadline = time.monotonic() + 120
        while (ready := httpx.get(f"{server.url}/readyz", timeout=5)).status_code != 200:
            assert server.process.poll() is None, server.log_tail()
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        body = ready.json()
        assert body["model_version"] == "v0000", body
        assert (body["serving"], body["active"], body["degraded"]) == ("v0000", "v0000", None)
        answer = httpx.post(
            f"{server.url}/generate", json={"prompt": "Hi", "reward": "top"}, timeout=30
        ).json()
        assert answer["model_version"] == "v0000" and answer["reward"]["applied"] is True
        assert server.metric("quark_model_fallback") == 0
    finally:
        server.stop()


def test_a_corrupt_active_version_falls_back_to_its_newest_verified_ancestor(
    tiny_qm: QuarkModel,
    tiny_model_dir: Path,
    tmp_path: Path,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    store = ModelStore(tmp_path / "data" / "models", RedisVersionPointer(redis_client, prefix))
    for parent in (None, "v0000", "v0001"):
        store.publish(tiny_qm, {"parent": parent})
    store.activate("v0002")
    weights = store.path("v0002") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # a bad disk: the active version no longer matches its checksums
    weights.write_bytes(bytes(data))

    server = start_server(tiny_model_dir, tmp_path, prefix, **FOLLOW_STORE)
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        body = ready.json()
        assert ready.status_code == 200 and body["model_version"] == "v0001", body
        assert (body["serving"], body["active"]) == ("v0001", "v0002"), body
        assert body["degraded"].startswith("v0002 failed verification: "), body
        assert "model.safetensors" in body["degraded"]
        assert server.metric("quark_model_fallback") == 1
        answer = httpx.post(
            f"{server.url}/generate", json={"prompt": "Hi", "reward": "top"}, timeout=30
        ).json()
        assert answer["model_version"] == "v0001" and answer["reward"]["applied"] is True
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        models = httpx.get(f"{server.url}/admin/models", headers=headers, timeout=30).json()
        assert (models["active"], models["serving"]) == ("v0002", "v0001")
        assert models["degraded"] == body["degraded"]
        verified = {v["version"]: (v["verified"], v["error"]) for v in models["versions"]}
        assert verified["v0000"] == (True, None) and verified["v0001"] == (True, None)
        assert verified["v0002"][0] is False and "model.safetensors" in verified["v0002"][1]
        assert "serving v0001 instead" in server.log_tail(20_000)
    finally:
        server.stop()
