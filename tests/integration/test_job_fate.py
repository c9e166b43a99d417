"""Each delivery of an unlearn job's message, against the job record in the real Redis (the
task body runs in-process with a fake runtime: no broker, no model).

The broker re-delivers a message that was never acknowledged (the worker died): the job must
then be recorded FAILED and not run again; a duplicate of a running attempt is dropped; our
own retry resumes; a cancelled or finished job never runs again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery.exceptions import Ignore

import worker.tasks as tasks
from quark.service.jobs import JobLost, JobRegistry

TTL_S = 0.4  # the job's heartbeat expiry (QUARK_JOB_LOCK_TTL_S)
LOST = "worker lost during the job (attempt 1); re-queue it with POST /admin/unlearn"


@pytest.fixture
def jobs(redis_client: redis.Redis) -> Iterator[JobRegistry]:
    prefix = f"qs-fate-{uuid.uuid4().hex[:8]}"
    yield JobRegistry(redis_client, prefix)
    keys = list(redis_client.scan_iter(f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def runs(
    jobs: JobRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, int]]:
    """Runs the task body with a fake runtime; returns the (job id, attempt) of every run."""
    ran: list[tuple[str, int]] = []
    rt = SimpleNamespace(
        jobs=jobs, settings=SimpleNamespace(job_lock_ttl_s=TTL_S, data_dir=tmp_path)
    )

    def attempt(_: Any, __: Any, job_id: str, ___: Any, number: int) -> dict[str, Any]:
        ran.append((job_id, number))
        return {"status": "published", "version": "v0001"}

    monkeypatch.setattr(tasks, "runtime", lambda: rt)
    monkeypatch.setattr(tasks, "_attempt", attempt)
    monkeypatch.setattr(tasks.unlearn, "update_state", lambda **_: None)  # no result backend
    return ran


def deliver(job_id: str, retries: int = 0) -> dict[str, Any]:
    """One delivery of the job's message, as a worker runs it."""
    tasks.unlearn.push_request(id=job_id, retries=retries)
    try:
        return dict(tasks.unlearn.run(overrides={}))
    finally:
        tasks.unlearn.pop_request()


def died_during_attempt(jobs: JobRegistry, job_id: str, attempt: int = 1) -> None:
    """What a worker killed mid-job leaves: its attempt marked, progress, no heartbeat."""
    jobs.register(job_id, "admin", {})
    assert jobs.claim_attempt(job_id, attempt, TTL_S) is None
    jobs.set_progress(job_id, {"phase": "train", "step": 3, "attempt": attempt})
    jobs.clear_heartbeat(job_id)


def test_a_job_runs_once_and_its_attempt_is_cleared(
    jobs: JobRegistry, runs: list[tuple[str, int]]
) -> None:
    jobs.register("j1", "admin", {})
    assert deliver("j1")["status"] == "published"
    assert runs == [("j1", 1)]
    assert jobs.claim_attempt("j1", 2, TTL_S) is None  # nothing left marked as running
    # Re-delivered after it finished: its fate stands, nothing runs.
    assert deliver("j1") == {"status": "published", "version": "v0001"}
    assert runs == [("j1", 1)]


def test_a_job_whose_worker_died_fails_and_never_runs_again(
    jobs: JobRegistry, runs: list[tuple[str, int]], tmp_path: Path
) -> None:
    died_during_attempt(jobs, "j2")
    checkpoint = tmp_path / "checkpoints" / "j2"
    checkpoint.mkdir(parents=True)  # from an earlier suspension: nothing resumes it now
    with pytest.raises(JobLost, match="worker lost during the job"):
        deliver("j2")  # the broker re-delivers the unacknowledged message
    assert runs == []
    info = jobs.info("j2")
    assert info is not None and info["result"] == {"status": "failed", "reason": LOST}
    assert not checkpoint.exists()
    with pytest.raises(JobLost):  # and on every later delivery
        deliver("j2")
    assert runs == []


def test_a_duplicate_of_a_running_attempt_is_dropped(
    jobs: JobRegistry, runs: list[tuple[str, int]]
) -> None:
    jobs.register("j3", "admin", {})
    assert jobs.claim_attempt("j3", 1, TTL_S) is None  # attempt 1 runs on another worker
    stop = threading.Event()

    def alive() -> None:
        while not stop.wait(TTL_S / 4):
            jobs.heartbeat("j3", TTL_S)

    keeper = threading.Thread(target=alive, daemon=True)
    keeper.start()
    try:
        with pytest.raises(Ignore):
            deliver("j3")
    finally:
        stop.set()
        keeper.join()
    assert runs == []
    info = jobs.info("j3")
    assert info is not None and "result" not in info  # the running attempt decides


def test_our_own_retry_resumes_even_if_the_marker_outlived_its_attempt(
    jobs: JobRegistry, runs: list[tuple[str, int]]
) -> None:
    died_during_attempt(jobs, "j4")  # attempt 1 suspended, but Redis failed to clear it
    assert deliver("j4", retries=1)["status"] == "published"
    assert runs == [("j4", 2)]


@pytest.mark.parametrize("lost", [False, True])
def test_a_cancelled_job_never_runs(
    jobs: JobRegistry, runs: list[tuple[str, int]], lost: bool
) -> None:
    if lost:
        died_during_attempt(jobs, "j5")
    else:
        jobs.register("j5", "admin", {})
    jobs.cancel("j5")
    with pytest.raises(Ignore):
        deliver("j5")
    assert runs == []
    info = jobs.info("j5")
    assert info is not None and info["result"]["status"] == "cancelled"
    with pytest.raises(Ignore):
        deliver("j5")
    assert runs == []


def test_a_job_lost_by_a_worker_that_marked_no_attempts_fails_too(
    jobs: JobRegistry, runs: list[tuple[str, int]]
) -> None:
    """A job started by an older worker (progress, no attempt marker), re-delivered after an
    upgrade: lost all the same."""
    jobs.register("j6", "admin", {})
    jobs.set_progress("j6", {"phase": "train", "step": 3})
    with pytest.raises(JobLost, match=r"attempt 1\)"):
        deliver("j6")
    assert runs == []
