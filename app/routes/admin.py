"""``/admin``: operator endpoints, always behind ``Authorization: Bearer <QUARK_ADMIN_TOKEN>``.

The privacy switch lives here; unlearn jobs, model versions and pool statistics are in
``app.routes.admin_models``. Every route inherits the ``require_admin`` dependency.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from app.auth import require_admin
from app.deps import PoolLoggerDep
from app.schemas import LoggingState, LoggingSwitch

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.get("/logging", response_model=LoggingState)
async def get_logging(pool_logger: PoolLoggerDep) -> LoggingState:
    """Whether completions are logged to the training pool (shared by all replicas)."""
    return LoggingState(enabled=pool_logger.enabled, shared=not pool_logger.switch_pending)


@router.put("/logging", response_model=LoggingState)
async def put_logging(body: LoggingSwitch, pool_logger: PoolLoggerDep) -> LoggingState:
    """Turn pool logging on or off (privacy switch), for every replica via Redis.

    Applied to this replica at once; if Redis is unreachable, ``shared`` is false and the
    value is stored in Redis as soon as it answers again.
    """
    shared = await asyncio.to_thread(pool_logger.set_enabled, body.enabled)
    return LoggingState(enabled=body.enabled, shared=shared)
