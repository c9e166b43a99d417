"""A job whose worker dies has one visible fate (issue 9): it fails, and never runs again.

Real processes: two Celery workers (one runs a job, the other holds a second job waiting for
the unlearn lock) are killed with SIGKILL; both jobs show LOST; the waiting one is cancelled.
A new worker with a 2 s visibility timeout gets both unacknowledged messages back from Redis
(the late acknowledgement re-delivers them; in production after the hard time limit + 600 s):
the running job is recorded FAILED without running again, the cancelled one stays cancelled,
and no version is ever published.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from quark.service.store import ModelStore
from testkit.stack import Stack, drop_keys, service_env, wait_for
from tests.conftest import REDIS_URL
from tests.e2e.conftest import FAST_JOBS

#: This checkout: the processes import it first (testkit.stack starts them in REPO, which
#: is the checkout's parent directory, where an editable install may point elsewhere).
CHECKOUT = Path(__file__).resolve().parents[2]
LOST_REASON = "worker lost during the job (attempt 1); re-queue it with POST /admin/unlearn"


@pytest.fixture
def fate_stack(redis_client: redis.Redis, toy_model_dir: Path, tmp_path: Path) -> Iterator[Stack]:
    prefix = f"qs-e2e-{uuid.uuid4().hex[:8]}"
    env = service_env(
        toy_model_dir, REDIS_URL, prefix, tmp_path / "data", **FAST_JOBS, PYTHONPATH=str(CHECKOUT)
    )
    stack = Stack(tmp_path, env)
    try:
        yield stack
    finally:
        stack.stop()
        drop_keys(redis_client, prefix)


def _view(admin: httpx.Client, job_id: str) -> dict[str, Any]:
    return dict(admin.get(f"/admin/jobs/{job_id}").raise_for_status().json())


def test_a_job_whose_worker_dies_fails_for_good_and_publishes_nothing(
    fate_stack: Stack, redis_client: redis.Redis, on_failure_logs: list[Stack]
) -> None:
    stack = fate_stack
    on_failure_logs.append(stack)
    workers = [stack.start_worker(), stack.start_worker()]
    stack.start_server()
    for i in range(20):  # 40 records, ~32 for training: above QUARK_UNLEARN_MIN_RECORDS
        stack.generate(f"Tell me about item {i}:", n=2, seed=i)
    store = ModelStore(Path(stack.env["QUARK_DATA_DIR"]) / "models")
    with stack.admin() as admin:
        running = admin.post("/admin/unlearn", json={"steps": 100_000}).json()["job_id"]
        wait_for(
            lambda: _view(admin, running)["progress"].get("step", 0) >= 1, 180, "the job to train"
        )
        waiting = admin.post("/admin/unlearn", json={"steps": 100_000}).json()["job_id"]
        wait_for(
            lambda: _view(admin, waiting)["progress"].get("phase") == "waiting",
            60,
            "the second job to wait for the lock on the other worker",
        )
        for worker in workers:
            worker.kill()  # SIGKILL: no clean-up, no acknowledgement
        for job_id in (running, waiting):
            wait_for(lambda j=job_id: _view(admin, j)["state"] == "LOST", 30, f"{job_id} LOST")

        # Cancelling a LOST job decides its fate at once: nothing will ever run it.
        cancelled = admin.delete(f"/admin/jobs/{waiting}").raise_for_status().json()
        assert cancelled["state"] == "CANCELLED", cancelled
        assert cancelled["result"]["status"] == "cancelled"

        # A new worker gets both messages back (visibility timeout 2 s) ...
        stack.env = {**stack.env, "QUARK_BROKER_VISIBILITY_TIMEOUT_S": "2"}
        stack.start_worker()
        failed = wait_for(
            lambda: (v := _view(admin, running))["state"] == "FAILURE" and v,
            150,
            "the re-delivered job to be recorded failed",
            interval=0.5,
        )
        # ... and acknowledges both without running either.
        celery = f"{stack.env['QUARK_KEY_PREFIX']}:celery"
        wait_for(
            lambda: (
                not redis_client.hlen(f"{celery}:unacked")
                and not redis_client.llen(f"{celery}:training")
            ),
            60,
            "every unlearn message to be acknowledged",
        )
        assert failed["result"] == {"status": "failed", "reason": LOST_REASON}, failed
        assert failed["progress"]["attempt"] == 1  # where it died: still shown
        after = _view(admin, running)
        assert after["state"] == "FAILURE" and after["result"] == failed["result"]
        assert admin.delete(f"/admin/jobs/{running}").status_code == 409  # finished
        still = _view(admin, waiting)
        assert still["state"] == "CANCELLED", still
        assert still["result"]["reason"] == "cancelled after its worker was lost"
        models = admin.get("/admin/models").raise_for_status().json()
    assert models["active"] == "v0000" and models["serving"] == "v0000"
    assert store.versions() == ["v0000"]
    log = stack.procs[-1].tail(100_000)
    assert f"job {running} failed: {LOST_REASON}" in log
