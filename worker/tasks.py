"""Celery tasks: thin shells over quark.online that pass ids and keys, never tensors."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from quark.service.jobs import JobLost
from quark.service.tasks import SCORE_TASK, TICK_TASK, TRAINING_QUEUE, UNLEARN_TASK
from quark.service.worker_status import Heartbeat
from worker.aux_tasks import maybe_queue_aux, parallel_scheme
from worker.celery_app import app, settings
from worker.runtime import (
    SHUTTING_DOWN,
    Runtime,
    cancel_check,
    cancel_task,
    job_deps,
    progress_reporter,
    runtime,
)

log = logging.getLogger(__name__)

# Tells the servers (/readyz, quark_worker_up) that this worker runs; no connection yet.
HEARTBEAT = Heartbeat(settings.redis_url, settings.key_prefix)


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """Connected before _bootstrap: a long first conversion must not hide the worker."""
    HEARTBEAT.start(str(getattr(sender, "hostname", None) or "worker"))


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    HEARTBEAT.stop()


@worker_ready.connect
def _bootstrap(**_: Any) -> None:
    """Publish version 0 if nobody has yet, so the servers have something to swap to."""
    try:
        log.info("active model version: %s", runtime().ensure_active())
    except Exception:  # the worker still serves scoring; jobs retry the bootstrap
        log.exception("could not make sure an active model version exists")


@worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    SHUTTING_DOWN.set()


@app.task(
    bind=True,
    name=SCORE_TASK,
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=settings.job_max_retries,
)
def score(self: Task) -> dict[str, Any]:
    """Score every pending pool record with the configured reward (idempotent)."""
    scored = runtime().score(blocking_s=60.0)
    return {"scored": scored or 0, "busy": scored is None}


@app.task(name=TICK_TASK, ignore_result=True, acks_late=True)
def tick() -> None:
    """Beat's heartbeat: score what is pending, then start a job if continuous mode says so."""
    rt = runtime()
    rt.score(blocking_s=0.0)
    if parallel_scheme(rt):
        maybe_queue_aux(rt)
    if rt.settings.continuous:
        _maybe_start_continuous(rt)


def _maybe_start_continuous(rt: Runtime) -> str | None:
    scored_total = int(rt.pool.stats()["scored"])
    last = rt.jobs.last_job()
    if last is None:  # first tick ever: count from now
        rt.jobs.mark_started(0)
        last = rt.jobs.last_job()
    assert last is not None
    from quark.online.scoring import trigger_reason

    reason = trigger_reason(
        time.time(),
        last[0],
        last[1],
        scored_total,
        rt.settings.continuous_interval_min * 60,
        rt.settings.continuous_min_new_records,
    )
    if reason is None or rt.unlearn_locked():
        return None
    job_id = f"auto-{int(time.time())}"
    if not rt.jobs.mark_queued(job_id, rt.settings.job_hard_time_limit_s):
        return None  # one continuous job is already waiting
    # No overrides: the job takes QUARK_OBJECTIVE and the other settings.
    objective = rt.settings.unlearn.objective
    rt.jobs.register(job_id, f"continuous ({objective}): {reason}", {})
    unlearn.apply_async(kwargs={"overrides": {}}, task_id=job_id, queue=TRAINING_QUEUE)
    log.info("continuous mode started job %s: %s", job_id, reason)
    return job_id


@app.task(
    bind=True,
    name=UNLEARN_TASK,
    acks_late=True,
    max_retries=settings.job_max_retries,
    soft_time_limit=settings.job_soft_time_limit_s,
    time_limit=settings.job_hard_time_limit_s,
)
def unlearn(self: Task, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One unlearn job of either objective (quark.online.objectives.run_job); its id is the
    job id.

    Every delivery reads the job's record before anything else: a finished job keeps its
    fate, a cancelled one never starts, and one whose earlier attempt died with its worker
    (acks_late: the broker re-delivers that message after its visibility timeout) is
    recorded FAILED instead of running again. Only our own retry (a checkpoint was saved)
    continues a job."""
    rt = runtime()
    job_id = str(self.request.id)
    cancelled = rt.jobs.cancelled(job_id)
    info = rt.jobs.info(job_id) or {}
    done = info.get("result")
    if done is not None:
        return _replay(self, dict(done))  # a re-delivered message of a finished job
    if cancelled:
        cancel_task(self, rt.jobs, "cancelled before it started")
    attempt = int(self.request.retries) + 1
    _claim(rt, job_id, attempt, started="progress" in info)
    try:
        result = _attempt(self, rt, job_id, overrides or {}, attempt)
        rt.jobs.set_result(job_id, result)
        return result
    finally:
        _end_attempt(rt, job_id)


def _attempt(
    task: Task, rt: Runtime, job_id: str, overrides: dict[str, Any], attempt: int
) -> dict[str, Any]:
    automatic = job_id.startswith("auto-")
    if not automatic:
        task.update_state(state="PROGRESS", meta={"phase": "waiting", "attempt": attempt})
        rt.jobs.set_progress(job_id, {"phase": "waiting", "attempt": attempt})
    # A continuous job gives way to a running one; an admin's job waits its turn.
    wait_s = 0.0 if automatic else float(rt.settings.job_hard_time_limit_s)
    with rt.unlearn_lock(job_id, wait_s=wait_s) as held:
        if automatic:
            rt.jobs.clear_queued()
        if not held:
            return {"status": "skipped", "reason": "another unlearn job is running"}
        return _run_locked(task, rt, job_id, overrides)


def _claim(rt: Runtime, job_id: str, attempt: int, started: bool) -> None:
    """Make ``attempt`` the job's running attempt, or end this delivery: a duplicate of an
    attempt still running elsewhere is dropped; one of an attempt whose worker died fails
    the job (JobLost), for good. ``started``: the job has progress from an earlier delivery."""
    ttl = rt.settings.job_lock_ttl_s
    marked = rt.jobs.claim_attempt(job_id, attempt, ttl)
    if marked is None:
        if not (started and attempt == 1):
            return
        # Progress but no attempt marked: a first attempt that started before attempts were
        # marked (an older worker) and was lost; nothing else leaves progress without one.
        marked = 1
    elif not _heartbeat_stops(rt, job_id, ttl):
        log.warning(
            "job %s: attempt %d still runs elsewhere; dropping this duplicate delivery",
            job_id,
            marked,
        )
        raise Ignore()
    if marked < attempt:
        # This delivery is our own retry: the earlier attempt saved a checkpoint and re-queued
        # the job (its marker outlived it only if Redis failed at that moment).
        rt.jobs.take_over(job_id, attempt, ttl)
        return
    reason = f"worker lost during the job (attempt {marked}); re-queue it with POST /admin/unlearn"
    log.error("job %s failed: %s", job_id, reason)
    rt.jobs.set_result(job_id, {"status": "failed", "reason": reason})
    from quark.online.job import drop_checkpoint

    drop_checkpoint(rt.settings.data_dir / "checkpoints" / job_id)
    raise JobLost(reason)


def _heartbeat_stops(rt: Runtime, job_id: str, ttl: float) -> bool:
    """Whether the job's heartbeat is gone, or goes within one TTL (then its worker is dead)."""
    deadline = time.monotonic() + ttl + 1.0
    while rt.jobs.alive(job_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(min(1.0, ttl / 4))
    return True


def _end_attempt(rt: Runtime, job_id: str) -> None:
    try:
        rt.jobs.end_attempt(job_id)
    except redis.RedisError as exc:  # the next delivery, our retry, takes over all the same
        log.warning("job %s: attempt marker not cleared (%s)", job_id, exc)


def _replay(task: Task, done: dict[str, Any]) -> dict[str, Any]:
    """The recorded fate again (Celery's state follows it); nothing is redone."""
    status = done.get("status")
    if status == "cancelled":
        cancel_task(task, None, str(done.get("reason", "cancelled")))
    if status == "failed":
        raise JobLost(str(done.get("reason") or done.get("error") or "failed"))
    return done


def _run_locked(task: Task, rt: Runtime, job_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {"phase": "score", "attempt": int(task.request.retries) + 1}

    progress = progress_reporter(task, rt.jobs, job_id, state)
    from quark.online.job import JobCancelled, JobSuspended, drop_checkpoint
    from quark.online.objectives import run_job

    progress({})
    params = rt.settings.unlearn_params(overrides)
    rt.score(blocking_s=60.0)
    rt.jobs.mark_started(int(rt.pool.stats()["scored"]))
    rt.ensure_active()
    deps = job_deps(rt, params.reward_spec)
    deadline = time.monotonic() + rt.settings.job_soft_time_limit_s
    checkpoint_dir = rt.settings.data_dir / "checkpoints" / job_id
    try:
        return run_job(  # params.objective picks the job: Quark or ACFT
            deps,
            params,
            job_id=job_id,
            progress=progress,
            should_stop=cancel_check(rt.jobs, job_id),
            should_suspend=lambda: SHUTTING_DOWN.is_set() or time.monotonic() > deadline,
            checkpoint_dir=checkpoint_dir,
        )
    except JobCancelled as exc:
        cancel_task(task, rt.jobs, str(exc), state)
    except Exception as exc:
        suspended = isinstance(exc, (JobSuspended, SoftTimeLimitExceeded))
        if suspended and task.request.retries < task.max_retries:
            # A checkpoint was saved: the retry (same job id) resumes from it.
            log.warning("job %s suspended (%s); re-queued to resume", job_id, exc)
            raise task.retry(exc=exc, countdown=5) from exc
        drop_checkpoint(checkpoint_dir)  # failed or out of retries: this job id never runs again
        raise
