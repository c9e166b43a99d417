"""The broker's visibility timeout: above the hard time limit unless set (tests set it low)."""

from __future__ import annotations

from pathlib import Path

from quark.service.broker import make_celery
from quark.service.settings import ServiceSettings


def _visibility(settings: ServiceSettings) -> int:
    return int(make_celery(settings).conf.broker_transport_options["visibility_timeout"])


def test_visibility_timeout_defaults_to_the_hard_limit_plus_600(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, job_hard_time_limit_s=3900)
    assert _visibility(settings) == 4500


def test_visibility_timeout_can_be_set(tmp_path: Path) -> None:
    settings = ServiceSettings(data_dir=tmp_path, broker_visibility_timeout_s=2)
    assert _visibility(settings) == 2
