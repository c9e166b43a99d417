"""ACFT's parallel scheme: the auxiliary head's Celery task, on its own queue (``aux``), so an
aux worker trains heads while the main worker runs LLM jobs (docs/acft.md).

Beat's tick queues one aux job per new active version (``maybe_queue_aux``); the job
(``quark.online.aux_job.AuxJob``) trains that version's head and publishes it beside the
version; later ACFT LLM jobs use the newest head. Re-running it is harmless: a version's
first head stays.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from celery import Task

from quark.service.aux_heads import AuxHeads
from quark.service.tasks import AUX_QUEUE, AUX_TASK
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


def parallel_scheme(rt: Runtime) -> bool:
    return rt.settings.unlearn.objective == "acft" and rt.settings.unlearn.acft_parallel


def maybe_queue_aux(rt: Runtime) -> str | None:
    """Queue the aux job of the active version unless its head exists or a job for it is
    queued or running (the marker expires after the hard time limit: a lost job is re-queued
    then). Returns the job id, or None."""
    version = rt.store.active()
    if version is None or AuxHeads(rt.store).get(version) is not None:
        return None
    job_id = f"aux-{version}-{int(time.time())}"
    ttl_ms = int(rt.settings.job_hard_time_limit_s * 1000)
    if not rt.client.set(rt.keys.aux_queued(version), job_id, nx=True, px=ttl_ms):
        return None
    rt.jobs.register(job_id, f"acft parallel scheme: auxiliary head of {version}", {})
    aux_head.apply_async(task_id=job_id, queue=AUX_QUEUE)
    log.info("queued aux job %s for %s", job_id, version)
    return job_id


@app.task(
    bind=True,
    name=AUX_TASK,
    acks_late=True,
    autoretry_for=(redis.ConnectionError, redis.TimeoutError),
    retry_backoff=True,
    max_retries=settings.job_max_retries,
    soft_time_limit=settings.job_soft_time_limit_s,
    time_limit=settings.job_hard_time_limit_s,
)
def aux_head(self: Task) -> dict[str, Any]:
    """Train and publish the auxiliary head of the active version (idempotent: a version
    that already has one is skipped). Its fate is recorded under its job id."""
    from quark.online.job import JobCancelled, JobSuspended
    from quark.online.objectives import run_aux_job

    rt = runtime()
    job_id = str(self.request.id)
    state: dict[str, Any] = {"phase": "score"}
    progress = progress_reporter(self, rt.jobs, job_id, state)
    if rt.jobs.cancelled(job_id):
        cancel_task(self, rt.jobs, "cancelled before it started")
    progress({})
    params = rt.settings.unlearn_params({})
    rt.score(blocking_s=60.0)
    try:
        result = run_aux_job(
            job_deps(rt, params.reward_spec),
            params,
            job_id=job_id,
            progress=progress,
            should_stop=cancel_check(rt.jobs, job_id),
            should_suspend=SHUTTING_DOWN.is_set,
        )
    except JobCancelled as exc:
        cancel_task(self, rt.jobs, str(exc), state)
    except JobSuspended:
        # The worker is stopping: nothing was published; the next tick queues it again.
        result = {"status": "interrupted", "reason": "the aux worker shut down"}
        rt.client.delete(rt.keys.aux_queued(str(rt.store.active())))
    except Exception as exc:  # the marker stays: a retry waits for it to expire
        rt.jobs.set_result(job_id, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
    rt.jobs.set_result(job_id, result)
    return result
