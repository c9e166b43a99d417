"""``/admin`` routes of online unlearning: jobs, model versions, pool statistics.

Every route needs ``Authorization: Bearer <QUARK_ADMIN_TOKEN>`` (``require_admin``).
Routes are plain ``def``: FastAPI runs them in its thread pool, so their Redis and disk
calls never block the event loop that streams tokens.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

import redis
from celery import Celery
from celery.result import AsyncResult
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, create_model

from app.auth import require_admin
from app.errors import APIError
from quark.online.pool_stats import reward_distribution
from quark.service.broker import make_celery
from quark.service.jobs import JobRegistry
from quark.service.redis_client import connect
from quark.service.redis_pool import RedisPool
from quark.service.settings import ServiceSettings, params_model_fields
from quark.service.store import (
    CorruptVersion,
    ModelStore,
    RedisVersionPointer,
    UnknownVersion,
)
from quark.service.tasks import TRAINING_QUEUE, UNLEARN_TASK
from quark.service.verification import VerificationCache

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])

STATS_WINDOW = 5000  # newest pool records the reward distribution is computed over
ALIVE = {"STARTED", "PROGRESS"}  # states in which a job renews its heartbeat
FINISHED = {"SUCCESS", "FAILURE", "REVOKED", "CANCELLED"}


@dataclass
class Backend:
    """Redis-side objects of the admin routes, built once per app."""

    settings: ServiceSettings
    client: redis.Redis
    store: ModelStore
    jobs: JobRegistry
    pool: RedisPool
    celery: Celery
    verified: VerificationCache = field(default_factory=VerificationCache)


def get_backend(request: Request) -> Backend:
    backend: Backend | None = getattr(request.app.state, "admin_backend", None)
    if backend is None:
        settings: ServiceSettings = request.app.state.settings
        client = connect(settings.redis_url)
        backend = Backend(
            settings=settings,
            client=client,
            store=ModelStore(settings.store_dir, RedisVersionPointer(client, settings.key_prefix)),
            jobs=JobRegistry(client, settings.key_prefix),
            pool=RedisPool(client, settings.key_prefix, settings.pool_max_records),
            celery=make_celery(settings),
        )
        request.app.state.admin_backend = backend
    return backend


BackendDep = Annotated[Backend, Depends(get_backend)]


def _redis_errors(func: Any) -> Any:
    """Redis unreachable -> 503 with Retry-After instead of a 500."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except redis.RedisError as exc:
            raise APIError(
                503,
                f"Redis is unreachable ({exc}); retry shortly",
                code="redis_unavailable",
                headers={"Retry-After": "5"},
            ) from exc

    return wrapper


# -- jobs ------------------------------------------------------------------------------------
#: Body of ``POST /admin/unlearn``: every job parameter (``quark.online.params``), optional;
#: an absent field keeps the configured value (``QUARK_UNLEARN_*``, ...).
UnlearnRequest: type[BaseModel] = create_model(
    "UnlearnRequest",
    __config__=ConfigDict(extra="forbid"),
    **params_model_fields(optional=True),
)


class JobCreated(BaseModel):
    job_id: str


@router.post("/unlearn", status_code=202, response_model=JobCreated)
@_redis_errors
def start_unlearn(
    backend: BackendDep,
    body: UnlearnRequest | None = None,
) -> JobCreated:
    """Queue an unlearn job on the training workers; poll ``GET /admin/jobs/{job_id}``.
    ``objective`` picks Quark (default: ``QUARK_OBJECTIVE``) or ACFT; an unknown one is a
    400 naming the valid values."""
    overrides = body.model_dump(exclude_none=True) if body else {}
    try:
        backend.settings.unlearn_params(overrides)  # 400 now rather than a failed job
    except (ValueError, KeyError) as exc:
        raise APIError(400, f"invalid unlearn parameters: {exc}", code="invalid_params") from exc
    job_id = uuid.uuid4().hex
    backend.jobs.register(job_id, "admin", overrides)
    backend.celery.send_task(
        UNLEARN_TASK, kwargs={"overrides": overrides}, task_id=job_id, queue=TRAINING_QUEUE
    )
    return JobCreated(job_id=job_id)


#: A result recorded in the job registry is the job's fate, whatever Celery's state says
#: (a re-delivered message may have rewritten it): its status names the state.
RECORDED_STATES = {"cancelled": "CANCELLED", "failed": "FAILURE"}


def job_view(backend: Backend, job_id: str, info: dict[str, Any]) -> dict[str, Any]:
    """State from Celery, progress and result from the job registry (they outlive Celery's)."""
    result = AsyncResult(job_id, app=backend.celery)
    done = info.get("result")
    if done is not None:
        state = RECORDED_STATES.get(str(done.get("status")), "SUCCESS")
    else:
        state = str(result.state)
    if state in ALIVE and info.get("progress") and not backend.jobs.alive(job_id):
        # Started, but its worker stopped renewing the heartbeat (died): the job never runs
        # again; it turns FAILURE when a worker receives its message again.
        state = "LOST"
    if done is None and state == "FAILURE":
        done = {"status": "failed", "error": f"{type(result.info).__name__}: {result.info}"}
    return {
        "job_id": job_id,
        "state": state,
        "progress": info.get("progress") or {},
        "result": done,
        "created": info["created"],
        "trigger": info["trigger"],
        "overrides": info["overrides"],
        "cancel_requested": backend.jobs.cancelled(job_id),
    }


def _info(backend: Backend, job_id: str) -> dict[str, Any]:
    info = backend.jobs.info(job_id)
    if info is None:
        raise APIError(404, f"no job {job_id!r}", param="job_id", code="job_not_found")
    return info


@router.get("/jobs")
@_redis_errors
def list_jobs(backend: BackendDep, limit: int = 50) -> dict[str, Any]:
    """The newest jobs (admin and continuous mode), newest first."""
    views = []
    for job_id in backend.jobs.job_ids(max(1, min(limit, 1000))):
        info = backend.jobs.info(job_id)
        if info is not None:
            views.append(job_view(backend, job_id, info))
    return {"jobs": views}


@router.get("/jobs/{job_id}")
@_redis_errors
def get_job(job_id: str, backend: BackendDep) -> dict[str, Any]:
    """``state`` (PENDING, PROGRESS, SUCCESS, FAILURE, CANCELLED, LOST, ...), ``progress``
    (phase, step, loss, kl, eval results, attempt) and ``result`` (status, version, eval, gate;
    a job whose worker died: ``{"status": "failed", "reason": "worker lost during ..."}``)."""
    return job_view(backend, job_id, _info(backend, job_id))


@router.delete("/jobs/{job_id}")
@_redis_errors
def cancel_job(job_id: str, backend: BackendDep) -> dict[str, Any]:
    """Cancel: a queued job never starts, a running one stops at its next step without
    publishing (it cannot be un-published once its version is out: activate another)."""
    info = _info(backend, job_id)
    view = job_view(backend, job_id, info)
    if view["state"] in FINISHED:
        raise APIError(409, f"job {job_id} already finished ({view['state']})", code="finished")
    backend.jobs.cancel(job_id)
    if view["state"] == "LOST":  # nothing runs it any more: its fate is decided now
        reason = "cancelled after its worker was lost"
        backend.jobs.set_result(job_id, {"status": "cancelled", "reason": reason})
    backend.celery.control.revoke(job_id)  # a queued message is dropped by the workers
    return job_view(backend, job_id, _info(backend, job_id))


# -- model versions --------------------------------------------------------------------------
def _version_view(backend: Backend, version: str, active: str | None) -> dict[str, Any]:
    view: dict[str, Any] = {"version": version, "active": version == active}
    error = backend.verified.error(backend.store, version)
    view.update(verified=error is None, error=error)
    try:
        meta = backend.store.metadata(version)
    except CorruptVersion:
        return view
    meta.pop("files", None)  # per-file digests: long and only for verification
    return {**view, "objective": _objective(meta), "metadata": meta}


def _objective(meta: dict[str, Any]) -> str | None:
    """Which objective made a version: recorded since ACFT exists; an older trained version
    was Quark's; the base version (v0000) was trained by none."""
    if meta.get("kind") != "unlearn":
        return None
    return str(meta.get("objective") or "quark")


@router.get("/models")
@_redis_errors
def list_models(backend: BackendDep, request: Request) -> dict[str, Any]:
    """Stored versions, oldest first, with the objective that made each (``quark``, ``acft``,
    None for the base), metadata and whether each verifies (checksums,
    cached until its files change); which is active; what this replica serves, and why that
    is not the active version (``degraded``) when it is not."""
    active = backend.store.active()
    engine = getattr(request.app.state, "engine", None)
    serving = engine.model.version if engine is not None and engine.model else None
    watcher = getattr(request.app.state, "model_watcher", None)
    versions = backend.store.versions()
    backend.verified.forget_all_but(versions)
    return {
        "active": active,
        "serving": serving,
        "degraded": watcher.degraded if watcher is not None else None,
        "versions": [_version_view(backend, v, active) for v in versions],
    }


@router.post("/models/{version}/activate")
@_redis_errors
def activate_model(version: str, backend: BackendDep) -> dict[str, Any]:
    """Make a stored version active (a rollback, or a version a gate refused to promote);
    every server swaps to it. Its checksums are verified first."""
    previous = backend.store.active()
    try:
        backend.store.activate(version)
    except UnknownVersion as exc:
        raise APIError(404, str(exc), param="version", code="version_not_found") from exc
    except CorruptVersion as exc:
        raise APIError(409, str(exc), param="version", code="version_corrupt") from exc
    return {"active": version, "previous": previous}


# -- pool ------------------------------------------------------------------------------------
@router.get("/pool/stats")
@_redis_errors
def pool_stats(backend: BackendDep) -> dict[str, Any]:
    """Pool size, scored/unscored counts, and the reward distribution of the newest records
    per model version, per reward token used, and per Quark quantile."""
    stats = backend.pool.stats()
    unscored = backend.pool.count_after(backend.pool.get_cursor("score"))
    newest = [r for _, r in backend.pool.newest(STATS_WINDOW)]
    return {
        "size": stats["records"],
        "scored": max(0, stats["records"] - unscored),
        "unscored": unscored,
        "max_records": stats["max_records"],
        "window": len(newest),
        **reward_distribution(newest, backend.settings.unlearn),
    }
