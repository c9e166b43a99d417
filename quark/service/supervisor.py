"""The process supervisor behind ``quark up``: starts children with prefixed logs,
restarts the ones with a restart policy (capped, with backoff), stops them together."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

log = logging.getLogger("quark.up")

STOP_TIMEOUT_S = 60.0


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
