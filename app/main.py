"""The FastAPI app: ``create_app(settings)``, or ``uvicorn app.main:create_app --factory``
(settings from ``QUARK_*`` environment variables)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from transformers.utils import logging as hf_logging

from app.engine import Engine
from app.errors import install_error_handlers
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, MetricsMiddleware, UnexpectedErrorMiddleware
from app.model_watcher import start_watcher
from app.pool_logger import PoolLogger
from app.routes import admin, admin_models, generate, health, openai
from app.service import GenerationService
from app.serving_model import check_serving_dtype
from app.streaming import ClientDisconnected
from quark.service.settings import ServiceSettings
from quark.service.worker_status import WorkerMonitor, WorkerStatus

log = logging.getLogger("app")

DESCRIPTION = """Reward-conditioned generation (Quark) over HTTP.

Every error has the shape `{"error": {"message", "type", "param", "code"}}` (the OpenAI
error object), on every endpoint. `reward`: `top` = best-reward quantile token (0),
`bottom` = worst (K-1), `none` = no reward token, an integer = that quantile (0 = best).
"""


class InsecureConfiguration(RuntimeError):
    """The app would expose /admin without a token."""


def _check_admin_token(settings: ServiceSettings) -> None:
    if settings.admin_token:
        return
    if not settings.insecure_dev:
        raise InsecureConfiguration(
            "QUARK_ADMIN_TOKEN is not set: refusing to start with an open /admin API. Set a "
            "token, or QUARK_INSECURE_DEV=1 for local development only."
        )
    log.warning(
        "QUARK_INSECURE_DEV is on and QUARK_ADMIN_TOKEN is empty: /admin is OPEN to anyone "
        "who can reach this server. Never run this way in production."
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the pool writer and the engine; load the model in the background so that
    /healthz answers at once and /readyz turns ready when the model is in."""
    settings: ServiceSettings = app.state.settings
    metrics: Metrics = app.state.metrics
    pool_logger = PoolLogger(settings, metrics)
    engine = Engine(settings, metrics)
    app.state.pool_logger = pool_logger
    app.state.engine = engine
    app.state.service = GenerationService(settings, engine, pool_logger, metrics)
    pool_logger.start()
    engine.start()
    threading.Thread(
        target=engine.load, args=(settings.model,), name="model-loader", daemon=True
    ).start()
    watcher = start_watcher(app)  # follows the store's active version (hot swap)

    def on_worker_status(status: WorkerStatus) -> None:
        metrics.set_worker_status(status.state == "up", status.last_seen)

    app.state.worker_monitor = monitor = WorkerMonitor(
        settings.redis_url, settings.key_prefix, on_update=on_worker_status
    )
    monitor.start()  # /readyz and quark_worker_up: is a Celery worker running?
    try:
        yield
    finally:
        await asyncio.to_thread(monitor.stop)
        await asyncio.to_thread(watcher.stop)
        await asyncio.to_thread(engine.stop)
        await asyncio.to_thread(pool_logger.stop)


async def _client_gone(_: Request, __: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the app; without ``settings`` they are read from the environment."""
    settings = settings or ServiceSettings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _check_admin_token(settings)
    check_serving_dtype(settings)
    hf_logging.disable_progress_bar()  # every hot swap loads weights: no bars in service logs
    metrics = Metrics()
    app = FastAPI(title="quark-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # counts 413s and 500s too
    # Outermost of ours: any unexpected error becomes one 500 and the connection stays up.
    app.add_middleware(UnexpectedErrorMiddleware)
    for module in (health, generate, openai, admin, admin_models):
        app.include_router(module.router)
    return app
