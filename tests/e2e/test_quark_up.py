"""`quark up` run exactly as a user would: one command, the whole service, clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from quark.service.redis_client import answers as redis_answers
from testkit.stack import ADMIN_TOKEN, REPO, drop_keys, free_port, service_env, wait_for
from tests.conftest import REDIS_URL
from tests.e2e.conftest import FAST_JOBS

QUARK = str(Path(sys.executable).parent / "quark")


@dataclass
class UpProcess:
    """A running `quark up`, its output collected line by line."""

    process: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)

    def output(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[int]:
        """Child pids, read from /proc (children live in their own sessions)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.process.pid:
                    found.append(int(entry.name))
        return found

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"quark up exited early:\n{self.output()[-5000:]}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def terminate(self, timeout: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_up(env: dict[str, str], *args: str) -> UpProcess:
    process = subprocess.Popen(
        [QUARK, "up", *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    up = UpProcess(process, f"http://127.0.0.1:{env['QUARK_PORT']}")
    threading.Thread(
        target=lambda: up.lines.extend(iter(process.stdout.readline, "")),  # type: ignore[union-attr]
        daemon=True,
    ).start()
    return up


@pytest.fixture
def up_env(toy_model_dir: Path, tmp_path: Path) -> Iterator[dict[str, str]]:
    prefix = f"qs-up-{uuid.uuid4().hex[:8]}"
    env = service_env(toy_model_dir, REDIS_URL, prefix, tmp_path / "data", **FAST_JOBS)
    env["QUARK_PORT"] = str(free_port())
    yield env
    if redis_answers(REDIS_URL):
        drop_keys(redis.Redis.from_url(REDIS_URL), prefix)


def _listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def _assert_clean_exit(up: UpProcess, children: list[int]) -> None:
    assert up.terminate() == 0, up.output()[-5000:]
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not _listening(up.url), "something still listens on the API port"


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _serving(url: str) -> str:
    answer = httpx.post(f"{url}/generate", json={"prompt": "Hi", "log": False}, timeout=60)
    return str(answer.raise_for_status().json()["model_version"])


def test_quark_up_serves_learns_and_stops_cleanly(
    redis_client: redis.Redis, up_env: dict[str, str]
) -> None:
    up = start_up(up_env)
    try:
        wait_for(up.ready, 240, "quark up to be ready")
        assert f"{up.url}/generate" in up.output() and ADMIN_TOKEN in up.output()
        children = up.children()
        assert len(children) == 3, up.output()[-3000:]  # api, worker, beat (Redis was given)
        wait_for(
            lambda: "[worker]" in up.output() and " ready." in up.output(),
            180,
            "the worker to be ready",
        )
        # Ready means serving the active version: v0000, bootstrapped by the worker or the API.
        wait_for(lambda: _serving(up.url) == "v0000", 120, "v0000 to be served")
        for i in range(30):
            body = {
                "prompt": f"Tell me about item {i}:",
                "n": 2,
                "seed": i,
                "reward": ("none", "top", "bottom")[i % 3],
            }
            httpx.post(f"{up.url}/generate", json=body, timeout=60).raise_for_status()
        with httpx.Client(base_url=up.url, headers=_admin(), timeout=30) as admin:
            job = admin.post("/admin/unlearn", json={}).raise_for_status().json()["job_id"]
            view = wait_for(
                lambda: (
                    (v := admin.get(f"/admin/jobs/{job}").json())["state"]
                    in ("SUCCESS", "FAILURE", "CANCELLED")
                    and v
                ),
                400,
                "the unlearning job to finish",
                interval=1,
            )
        assert view["state"] == "SUCCESS" and view["result"]["status"] == "published", view
        wait_for(
            lambda: _serving(up.url) == view["result"]["version"],
            60,
            "the new version to be served",
        )
        _assert_clean_exit(up, children)
        assert "[api]" in up.output() and "[beat]" in up.output()
    finally:
        if up.process.poll() is None:
            os.killpg(up.process.pid, signal.SIGKILL)


def test_dead_redis_url_starts_the_embedded_redis_and_keeps_the_pool(
    toy_model_dir: Path, up_env: dict[str, str]
) -> None:
    up_env["QUARK_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for attempt in range(2):  # the second run reuses the data dir: the pool is still there
        up = start_up(up_env, "--no-worker")
        try:
            wait_for(up.ready, 240, "quark up to be ready")
            assert "starting the embedded one" in up.output()
            match = re.search(r"redis:\s+(redis://\S+)", up.output())
            assert match, up.output()[-3000:]
            pool = redis.Redis.from_url(match.group(1))
            stream = f"{up_env['QUARK_KEY_PREFIX']}:pool"
            before = pool.xlen(stream)
            if attempt == 1:
                assert before >= 2, "the embedded Redis lost the pool across restarts"
            children = up.children()
            httpx.post(
                f"{up.url}/generate", json={"prompt": "Hello", "n": 2}, timeout=60
            ).raise_for_status()
            target = before + 2
            wait_for(lambda p=pool, s=stream, t=target: p.xlen(s) >= t, 30, "pool records")
            _assert_clean_exit(up, children)
        finally:
            if up.process.poll() is None:
                os.killpg(up.process.pid, signal.SIGKILL)
    assert (Path(up_env["QUARK_DATA_DIR"]) / "redis").is_dir()
