"""app.pool_logger without Redis: spooling, the spool bound, and counted losses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from app.metrics import Metrics
from app.pool_logger import PoolLogger
from quark.pool import PoolRecord
from quark.service.settings import ServiceSettings


def _dead_port_settings(tmp_path: Path, **kw: object) -> ServiceSettings:
    return ServiceSettings(
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:1/0",  # nothing listens on port 1
        redis_timeout_s=0.2,
        redis_retry_s=0.1,
        **kw,  # type: ignore[arg-type]
    )


def test_records_go_to_the_spool_when_redis_is_unreachable(tmp_path: Path) -> None:
    metrics = Metrics()
    logger = PoolLogger(_dead_port_settings(tmp_path), metrics)
    logger.start()
    try:
        for i in range(5):
            logger.log(PoolRecord(prompt=f"p{i}", completion="c"))
        assert logger.flush()
        assert len(logger.spool) == 5 and logger.ready() and not logger.redis_up
        assert metrics.pool_spooled._value.get() == 5
    finally:
        logger.stop()


def test_spool_bound_counts_and_logs_the_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    logger = PoolLogger(_dead_port_settings(tmp_path, spool_max_records=2), metrics)
    logger.start()
    try:
        with caplog.at_level(logging.ERROR):
            for i in range(5):
                logger.log(PoolRecord(prompt=f"p{i}", completion="c"))
            assert logger.flush()
        assert len(logger.spool) == 2
        assert metrics.pool_dropped.labels(reason="spool_full")._value.get() == 3
        assert "dropped" in caplog.text
        assert not logger.ready()  # Redis down and the spool full: /readyz says not ready
    finally:
        logger.stop()


def test_switch_set_while_redis_is_down_is_kept_locally(tmp_path: Path) -> None:
    logger = PoolLogger(_dead_port_settings(tmp_path), Metrics())
    assert logger.set_enabled(False) is False  # not shared yet
    assert logger.enabled is False and logger.switch_pending
