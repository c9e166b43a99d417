"""quark up's pure helpers."""

from __future__ import annotations

import pytest

from quark.service.up import thread_split


@pytest.mark.parametrize(("cores", "api", "worker"), [(1, 1, 1), (2, 1, 1), (3, 1, 2), (16, 8, 8)])
def test_api_and_worker_split_the_cores(cores: int, api: int, worker: int) -> None:
    assert thread_split({}, cores) == {
        "QUARK_TORCH_THREADS": str(api),
        "QUARK_WORKER_TORCH_THREADS": str(worker),
    }


@pytest.mark.parametrize("configured", ["QUARK_TORCH_THREADS", "QUARK_WORKER_TORCH_THREADS"])
def test_a_configured_thread_count_is_left_alone(configured: str) -> None:
    assert thread_split({configured: "3"}, 16) == {}
