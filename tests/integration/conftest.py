"""Integration fixtures: real uvicorn server subprocesses (tiny model) and the real Redis.

The main server is started once per session with API keys, an admin token and small
limits (so bad-input and queue tests are cheap); every run uses its own Redis key
prefix so concurrent runs never see each other's records.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from quark.service.up import api_argv, free_port
from testkit.env import isolated_env
from tests.conftest import REDIS_URL

API_KEY = "test-key"
ADMIN_TOKEN = "admin-secret"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    prefix: str

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose label text contains ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        total = 0.0
        for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
            if labels in (match.group(1) or ""):
                total += float(match.group(2))
        return total

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no completion is decoding or queued (tests must not leak load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric("quark_active_rows") == 0 and self.metric("quark_queue_depth") == 0:
                return
            time.sleep(0.05)
        raise AssertionError("server still busy")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    model: Path | str, workdir: Path, prefix: str, timeout: float = 180, **env: str
) -> Server:
    """Start ``uvicorn app.main:create_app --factory`` and wait until /readyz says ready."""
    port = free_port()
    server_defaults = {
        "QUARK_MODEL": str(model),
        "QUARK_REDIS_URL": REDIS_URL,
        "QUARK_KEY_PREFIX": prefix,
        "QUARK_DATA_DIR": str(workdir / "data"),
        "QUARK_ADMIN_TOKEN": ADMIN_TOKEN,
        "QUARK_REDIS_RETRY_S": "0.2",
        "QUARK_TORCH_THREADS": "1",
        "QUARK_LOG_LEVEL": "info",
        # These tests pin one model; following the model store (hot swap) is tested apart.
        "QUARK_WATCH_VERSIONS": "0",
    }
    base = isolated_env(server_defaults, env)
    log_path = workdir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            api_argv("127.0.0.1", port), cwd=REPO, env=base, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path, prefix)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"qs-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    keys = list(redis_client.scan_iter(f"{prefix}*"))  # also the slow test's "{prefix}-default"
    if keys:
        redis_client.delete(*keys)


@pytest.fixture(scope="session")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, key_prefix: str
) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("server")
    server = start_server(
        tiny_model_dir,
        workdir,
        key_prefix,
        QUARK_API_KEYS=f"{API_KEY},second-key",
        QUARK_MAX_BODY_BYTES="20000",
        QUARK_MAX_N="4",
        QUARK_MAX_BATCH_SIZE="8",
        QUARK_MAX_QUEUE="8",
        QUARK_MAX_NEW_TOKENS_LIMIT="400",
        QUARK_DEFAULT_MAX_NEW_TOKENS="8",
        QUARK_SERVED_MODEL_NAME="quark-tiny",
    )
    yield server
    server.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
        yield http
    server.wait_idle()


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        yield http
