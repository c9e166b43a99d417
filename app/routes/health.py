"""Liveness, readiness and Prometheus metrics (no authentication: for probes/scrapers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from app.deps import MetricsDep, PoolLoggerDep, ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready; the body says why."}})
async def readyz(service: ServiceDep, pool_logger: PoolLoggerDep) -> JSONResponse:
    """Ready: the model is loaded and pool records can go somewhere (Redis or the spool)."""
    body: dict[str, Any] = {**service.status(), "pool": pool_logger.status()}
    ready = body["model_loaded"] and service.engine.ready and pool_logger.ready()
    body["status"] = "ready" if ready else "not ready"
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(metrics.render(), media_type=metrics.content_type)
