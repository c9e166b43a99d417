"""FastAPI dependencies: objects the lifespan created, taken from ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import Engine
from app.metrics import Metrics
from app.pool_logger import PoolLogger
from app.service import GenerationService
from quark.service.settings import ServiceSettings


def get_settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


def get_service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_pool_logger(request: Request) -> PoolLogger:
    pool_logger: PoolLogger = request.app.state.pool_logger
    return pool_logger


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
ServiceDep = Annotated[GenerationService, Depends(get_service)]
EngineDep = Annotated[Engine, Depends(get_engine)]
PoolLoggerDep = Annotated[PoolLogger, Depends(get_pool_logger)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
