"""quark up's supervisor: the restart policy (pure), restarts of real dummy children, and
children that die with a supervisor killed by SIGKILL."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quark.service.supervisor import RestartPolicy, Supervisor
from testkit.clock import FakeClock

REPO = Path(__file__).resolve().parents[2]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_backoff_doubles_up_to_the_limit_of_restarts_in_the_window() -> None:
    clock = FakeClock()
    policy = RestartPolicy(clock=clock)  # 5 in 10 minutes, 1 s doubling, capped at 30 s
    assert [policy.next_delay() for _ in range(5)] == [1, 2, 4, 8, 16]
    clock.now = 599.0
    assert policy.next_delay() is None  # a sixth crash within 10 minutes: give up
    clock.now = 600.0
    assert policy.next_delay() == 1  # the old restarts left the window: backoff starts over


def test_the_window_slides_and_the_backoff_is_capped() -> None:
    clock = FakeClock()
    policy = RestartPolicy(max_restarts=8, window_s=100, first_s=1, max_s=30, clock=clock)
    delays = []
    for t in range(0, 80, 10):  # a crash every 10 s
        clock.now = t
        delays.append(policy.next_delay())
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    clock.now = 95
    assert policy.next_delay() is None
    clock.now = 100.5  # the crash at t=0 left the window: one restart allowed again
    assert policy.next_delay() == 30
    assert policy.next_delay() is None


def _check_until(
    supervisor: Supervisor, done: Callable[[], bool], timeout: float = 20
) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = supervisor.check()
        if status is not None or done():
            return status
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_a_crashed_child_is_restarted_with_backoff_until_its_restarts_run_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="quark.up")
    supervisor = Supervisor(env=dict(os.environ))
    exits: list[int] = []
    try:
        api = supervisor.start("api", SLEEPER)
        flaky = supervisor.start(
            "flaky",
            [sys.executable, "-c", "import sys; sys.exit(3)"],
            policy=RestartPolicy(max_restarts=2, window_s=60, first_s=0.2, max_s=1),
            on_exit=lambda: exits.append(1),
        )
        assert os.getsid(api.process.pid) == api.process.pid  # own session: Ctrl-C is ours
        first = flaky.process.pid
        started = time.monotonic()
        assert _check_until(supervisor, lambda: flaky.restarts == 2) is None
        assert time.monotonic() - started >= 0.2 + 0.4  # the backoff doubled
        assert flaky.process.pid != first
        assert _check_until(supervisor, lambda: False) == 1  # third exit: restarts exhausted
        assert len(exits) == 2
        assert api.process.poll() is None  # the sibling was never touched
        text = caplog.text
        assert text.count("flaky exited with code 3; restarting it in") == 2
        assert "restarted flaky (restart 1, pid" in text
        assert "restarted flaky (restart 2, pid" in text
        assert "it was restarted 2 times in the last 60s" in text
    finally:
        supervisor.stop_all()
    assert api.process.returncode == -signal.SIGTERM


def test_a_child_killed_by_a_signal_is_logged_with_the_signal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(env=dict(os.environ))
    try:
        worker = supervisor.start("worker", SLEEPER, policy=RestartPolicy(first_s=0.05))
        first = worker.process.pid
        os.kill(first, signal.SIGKILL)
        assert _check_until(supervisor, lambda: worker.restarts == 1) is None
        assert worker.process.pid != first and worker.process.poll() is None
        assert "worker exited with code -9 (SIGKILL); restarting it in 0.05s" in caplog.text
    finally:
        supervisor.stop_all()


def test_a_child_without_a_restart_policy_stops_the_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor(env=dict(os.environ))
    try:
        supervisor.start("api", [sys.executable, "-c", "import sys; sys.exit(2)"])
        worker = supervisor.start("worker", SLEEPER, policy=RestartPolicy())
        assert _check_until(supervisor, lambda: False) == 1
        assert "api exited with code 2; stopping the service" in caplog.text
        assert worker.restarts == 0
    finally:
        supervisor.stop_all()


# A supervisor in its own process, killed by SIGKILL: its child must not live on.
_SUPERVISED = """
import os, sys, time
from quark.service.supervisor import Supervisor
supervisor = Supervisor(env=dict(os.environ))
child = supervisor.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
print("child", child.process.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_children_die_when_the_supervisor_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISED],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = 0
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        assert line.startswith("child "), line
        child = int(line.split()[1])
        assert _alive(child)
        parent.kill()  # SIGKILL: no handler, no cleanup
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its supervisor (an orphan)"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
