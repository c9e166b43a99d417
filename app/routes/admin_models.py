"""``/admin`` routes of online unlearning: jobs, model versions, pool statistics.

Every route needs ``Authorization: Bearer <QUARK_ADMIN_TOKEN>`` (``require_admin``).
Routes are plain ``def``: FastAPI runs them in its thread pool, so their Redis and disk
calls never block the event loop that streams tokens.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from celery import Celery
from celery.result import AsyncResult
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from app.auth import require_admin
from app.errors import APIError
from quark.jobs import JobRegistry
from quark.online import params_from_settings, reward_distribution
from quark.redis_pool import RedisPool
from quark.settings import ServiceSettings
from quark.store import CorruptVersion, ModelStore, RedisVersionPointer, UnknownVersion
from worker.celery_app import TRAINING_QUEUE, UNLEARN_TASK, make_celery

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


def get_backend(request: Request) -> Backend:
    backend: Backend | None = getattr(request.app.state, "admin_backend", None)
    if backend is None:
        settings: ServiceSettings = request.app.state.settings
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
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
class UnlearnRequest(BaseModel):
    """Overrides of the job's settings (``QUARK_UNLEARN_*``, ``QUARK_EVAL_*``, ...)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description="toxicity | sentiment | repetition")
    reward: str | None = Field(None, description="reward spec, e.g. 'keyword:the'")
    steps: int | None = Field(None, ge=1, le=100_000)
    kl_coef: float | None = Field(None, ge=0)
    entropy_coef: float | None = Field(None, ge=0)
    lr: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1, le=1024)
    window: int | None = Field(None, ge=1, description="newest scored records to train on")
    min_records: int | None = Field(None, ge=2)
    explore_prompts: int | None = Field(None, ge=0, description="fresh top-token samples")
    sample_interval: int | None = Field(None, ge=1)
    response_length: int | None = Field(None, ge=1, le=512)
    eval_fraction: float | None = Field(None, ge=0, lt=1)
    eval_prompts: int | None = Field(None, ge=1)
    eval_samples: int | None = Field(None, ge=1)
    reward_tolerance: float | None = Field(None, ge=0)
    max_perplexity_rise: float | None = Field(None, ge=0)
    max_kl: float | None = Field(None, gt=0, description="bound on mean per-token KL to original")
    seed: int | None = None


class JobCreated(BaseModel):
    job_id: str


@router.post("/unlearn", status_code=202, response_model=JobCreated)
@_redis_errors
def start_unlearn(backend: BackendDep, body: UnlearnRequest | None = None) -> JobCreated:
    """Queue an unlearn job on the training workers; poll ``GET /admin/jobs/{job_id}``."""
    overrides = body.model_dump(exclude_none=True) if body else {}
    try:
        params_from_settings(backend.settings, overrides)  # 400 now rather than a failed job
    except (ValueError, KeyError) as exc:
        raise APIError(400, f"invalid unlearn parameters: {exc}", code="invalid_params") from exc
    job_id = uuid.uuid4().hex
    backend.jobs.register(job_id, "admin", overrides)
    backend.celery.send_task(
        UNLEARN_TASK, kwargs={"overrides": overrides}, task_id=job_id, queue=TRAINING_QUEUE
    )
    return JobCreated(job_id=job_id)


def job_view(backend: Backend, job_id: str, info: dict[str, Any]) -> dict[str, Any]:
    """State from Celery, progress and result from the job registry (they outlive Celery's)."""
    result = AsyncResult(job_id, app=backend.celery)
    state = str(result.state)
    done = info.get("result")
    if done is not None and state not in FINISHED:
        state = "CANCELLED" if done.get("status") == "cancelled" else "SUCCESS"
    elif state in ALIVE and info.get("progress") and not backend.jobs.alive(job_id):
        state = "LOST"  # started, but its worker stopped renewing the heartbeat (died)
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
    (phase, step, loss, kl, eval results) and ``result`` (status, version, eval, gate)."""
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
    backend.celery.control.revoke(job_id)  # a queued message is dropped by the workers
    return job_view(backend, job_id, info)


# -- model versions --------------------------------------------------------------------------
def _version_view(store: ModelStore, version: str, active: str | None) -> dict[str, Any]:
    try:
        meta = store.metadata(version)
    except CorruptVersion as exc:
        return {"version": version, "active": version == active, "error": str(exc)}
    meta.pop("files", None)  # per-file digests: long and only for verification
    return {"version": version, "active": version == active, "metadata": meta}


@router.get("/models")
@_redis_errors
def list_models(backend: BackendDep, request: Request) -> dict[str, Any]:
    """Stored versions, oldest first, with metadata; which is active; what this replica serves."""
    active = backend.store.active()
    engine = getattr(request.app.state, "engine", None)
    serving = engine.model.version if engine is not None and engine.model else None
    return {
        "active": active,
        "serving": serving,
        "versions": [_version_view(backend.store, v, active) for v in backend.store.versions()],
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
        **reward_distribution(newest, backend.settings.num_quantiles),
    }
