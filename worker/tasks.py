"""Celery tasks: thin shells over quark.online that pass ids and keys, never tensors."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

import redis
from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import worker_ready, worker_shutting_down

from quark.online import (
    JobCancelled,
    JobSuspended,
    UnlearnDeps,
    params_from_settings,
    reward_spec,
    run_unlearn,
    trigger_reason,
)
from quark.unlearn import drop_checkpoint
from worker.celery_app import SCORE_TASK, TICK_TASK, TRAINING_QUEUE, UNLEARN_TASK, app
from worker.runtime import SHUTTING_DOWN, Runtime, original_model, reward_fn, runtime

log = logging.getLogger(__name__)

CANCELLED = "CANCELLED"
_settings = runtime().settings


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
    max_retries=_settings.job_max_retries,
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
    if rt.settings.continuous:
        _maybe_start_continuous(rt)


def _maybe_start_continuous(rt: Runtime) -> str | None:
    scored_total = int(rt.pool.stats()["scored"])
    last = rt.jobs.last_job()
    if last is None:  # first tick ever: count from now
        rt.jobs.mark_started(0)
        last = rt.jobs.last_job()
    assert last is not None
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
    rt.jobs.register(job_id, f"continuous: {reason}", {})
    unlearn.apply_async(kwargs={"overrides": {}}, task_id=job_id, queue=TRAINING_QUEUE)
    log.info("continuous mode started job %s: %s", job_id, reason)
    return job_id


@app.task(
    bind=True,
    name=UNLEARN_TASK,
    acks_late=True,
    max_retries=_settings.job_max_retries,
    soft_time_limit=_settings.job_soft_time_limit_s,
    time_limit=_settings.job_hard_time_limit_s,
)
def unlearn(self: Task, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """One unlearn job (see quark.online.run_unlearn); its id is the job id."""
    rt = runtime()
    job_id = str(self.request.id)
    done = (rt.jobs.info(job_id) or {}).get("result")
    if done is not None:
        return dict(done)  # a re-delivered message of a finished job: nothing to redo
    if rt.jobs.cancelled(job_id):
        _cancelled(self, "cancelled before it started")
    automatic = job_id.startswith("auto-")
    if not automatic:
        self.update_state(state="PROGRESS", meta={"phase": "waiting"})
        rt.jobs.set_progress(job_id, {"phase": "waiting"})
    # A continuous job gives way to a running one; an admin's job waits its turn.
    wait_s = 0.0 if automatic else float(rt.settings.job_hard_time_limit_s)
    with rt.unlearn_lock(job_id, wait_s=wait_s) as held:
        if automatic:
            rt.jobs.clear_queued()
        if not held:
            result = {"status": "skipped", "reason": "another unlearn job is running"}
        else:
            result = _run_locked(self, rt, job_id, overrides or {})
    rt.jobs.set_result(job_id, result)
    return result


def _run_locked(task: Task, rt: Runtime, job_id: str, overrides: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {"phase": "score", "attempt": task.request.retries}

    def progress(event: dict[str, Any]) -> None:
        state.update(event)
        try:
            task.update_state(state="PROGRESS", meta=dict(state))
            rt.jobs.set_progress(job_id, state)  # outlives Celery's meta (the result replaces it)
        except redis.RedisError as exc:  # progress is best effort: training goes on
            log.warning("job %s: progress not recorded (%s)", job_id, exc)

    def cancelled() -> bool:
        try:
            return rt.jobs.cancelled(job_id)
        except redis.RedisError:
            return False  # cannot tell during a Redis outage: keep going

    progress({})
    params = params_from_settings(rt.settings, overrides)
    rt.score(blocking_s=60.0)
    rt.jobs.mark_started(int(rt.pool.stats()["scored"]))
    rt.ensure_active()
    deps = _deps(rt, reward_spec(params.task, params.reward))
    deadline = time.monotonic() + rt.settings.job_soft_time_limit_s
    checkpoint_dir = rt.settings.data_dir / "checkpoints" / job_id
    try:
        return run_unlearn(
            deps,
            params,
            job_id=job_id,
            progress=progress,
            should_stop=cancelled,
            should_suspend=lambda: SHUTTING_DOWN.is_set() or time.monotonic() > deadline,
            checkpoint_dir=checkpoint_dir,
        )
    except JobCancelled as exc:
        _cancelled(task, str(exc), state)
    except Exception as exc:
        suspended = isinstance(exc, (JobSuspended, SoftTimeLimitExceeded))
        if suspended and task.request.retries < task.max_retries:
            # A checkpoint was saved: the retry (same job id) resumes from it.
            log.warning("job %s suspended (%s); re-queued to resume", job_id, exc)
            raise task.retry(exc=exc, countdown=5) from exc
        drop_checkpoint(checkpoint_dir)  # failed or out of retries: this job id never runs again
        raise


def _deps(rt: Runtime, spec: str) -> UnlearnDeps:
    return UnlearnDeps(
        store=rt.store,
        pool=rt.pool,
        original=original_model(rt.settings.model, rt.settings.device),
        reward_fn=reward_fn(spec),
        device=rt.settings.device,
        rescore=spec != rt.scoring_spec,  # an admin override: score the window again
    )


def _cancelled(task: Task, reason: str, state: dict[str, Any] | None = None) -> NoReturn:
    meta = {**(state or {}), "phase": "cancelled", "reason": reason}
    task.update_state(state=CANCELLED, meta=meta)
    runtime().jobs.set_result(str(task.request.id), {"status": "cancelled", "reason": reason})
    raise Ignore()
