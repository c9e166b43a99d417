"""ACFT's parallel scheme with real processes: server, the main worker (scoring + training
queues), an aux worker (queue ``aux``) and beat, toy model, reward ``keyword:the``. Beat's tick
queues the active version's head on the aux worker; an ACFT job then uses that head, the
server swaps to its version, and the tick queues the new version's head."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from quark.service.aux_heads import AuxHeads
from quark.service.tasks import AUX_QUEUE
from testkit.stack import Stack, wait_for
from tests.e2e.conftest import FAST_JOBS, shared_redis_stack
from tests.e2e.test_acft_loop import ACFT_JOB, TRAFFIC
from tests.e2e.test_online_loop import run_job, store_of

PARALLEL = {
    **FAST_JOBS,
    "QUARK_OBJECTIVE": "acft",
    "QUARK_UNLEARN_ACFT_PARALLEL": "1",
    "QUARK_UNLEARN_ACFT_AUX_STEPS": "4",
    "QUARK_UNLEARN_ACFT_AUX_BATCH_SIZE": "8",
    "QUARK_UNLEARN_ACFT_THRESHOLD": "0.05",
    "QUARK_UNLEARN_EXPLORE_PROMPTS": "4",
    "QUARK_BEAT_TICK_S": "2",
}


@pytest.fixture(scope="module")
def parallel_stack(
    redis_client: redis.Redis, toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("parallel")
    with shared_redis_stack(redis_client, toy_model_dir, workdir, PARALLEL) as stack:
        stack.start_worker()
        stack.start_worker(queues=(AUX_QUEUE,))
        stack.start_server()
        stack.start_beat()
        yield stack


def test_heads_train_on_the_aux_worker_and_llm_jobs_use_them(
    parallel_stack: Stack, on_failure_logs: list[Stack]
) -> None:
    on_failure_logs.append(parallel_stack)
    stack = parallel_stack
    stack.wait_serving("v0000")
    for i, prompt in enumerate(TRAFFIC):
        stack.generate(prompt, reward="none", n=2, seed=i)
    heads = AuxHeads(store_of(stack))
    wait_for(lambda: heads.get("v0000"), 300, "the aux worker to publish the head of v0000")
    aux_log = next(p for p in stack.procs if p.name == "worker" and p is not stack.procs[0])
    ran = "Task aux_head_job["  # Celery's "received" line (both banners list the task)
    assert ran in aux_log.tail(50_000)
    assert ran not in stack.procs[0].tail(50_000)  # the main worker never ran one
    view = run_job(stack, {k: v for k, v in ACFT_JOB.items() if k != "objective"})
    assert view["state"] == "SUCCESS" and view["result"]["status"] == "published", view
    stack.wait_serving("v0001")
    meta = store_of(stack).metadata("v0001")
    assert meta["objective"] == "acft"
    assert meta["aux_head"]["parallel"] is True and meta["aux_head"]["base_version"] == "v0000"
    # The new active version gets its own head, warm-started from v0000's.
    wait_for(lambda: heads.get("v0001"), 300, "the aux worker to publish the head of v0001")
    assert heads.metadata("v0001")["warm_start"] == "v0000"
    with stack.admin() as admin:
        listed = admin.get("/admin/jobs").json()["jobs"]
    assert any(str(j["job_id"]).startswith("aux-v0000") for j in listed), listed
