"""Liveness, readiness and Prometheus metrics (no authentication: for probes/scrapers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.deps import MetricsDep, PoolLoggerDep, ServiceDep
from quark.service.worker_status import WorkerMonitor

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready; the body says why."}})
async def readyz(request: Request, service: ServiceDep, pool_logger: PoolLoggerDep) -> JSONResponse:
    """Ready: the model is loaded and pool records can go somewhere (Redis or the spool).

    Following the model store, the model is the active version (or, if that one fails
    verification, a verified ancestor: ``degraded`` says so); nothing is loaded before.
    ``worker`` (``state``: up, down, or unknown while Redis does not answer; ``last_seen``;
    ``alive``) says whether a Celery worker runs; generation does not need one, so it never
    makes this endpoint fail. Read from caches: no Redis call on this path.
    """
    monitor: WorkerMonitor = request.app.state.worker_monitor
    body: dict[str, Any] = {
        **service.status(),
        "pool": pool_logger.status(),
        "worker": monitor.status().as_dict(),
    }
    watcher = getattr(request.app.state, "model_watcher", None)
    if watcher is not None:
        body.update(watcher.status())  # serving, active, degraded
    ready = body["model_loaded"] and service.engine.ready and pool_logger.ready()
    body["status"] = "ready" if ready else "not ready"
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), media_type=metrics.content_type)
