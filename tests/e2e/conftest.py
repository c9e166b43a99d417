"""End-to-end fixtures: the toy model, a real Redis, and stacks of real processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from testkit.stack import Stack, drop_keys, service_env
from tests.conftest import REDIS_URL
from tests.e2e.toy_model import save_toy_model

# Small, fast jobs on the toy model; the tolerance absorbs the noise of a 16-sample eval.
FAST_JOBS = {
    "QUARK_REWARD": "keyword:the",
    "QUARK_UNLEARN_STEPS": "30",
    "QUARK_UNLEARN_LR": "1e-2",
    "QUARK_UNLEARN_BATCH_SIZE": "16",
    "QUARK_UNLEARN_WARMUP_STEPS": "2",
    "QUARK_UNLEARN_MIN_RECORDS": "20",
    "QUARK_UNLEARN_RESPONSE_LENGTH": "12",
    # Train on served traffic only: these tests check the loop's mechanics, and top-token
    # samples of the untrained toy model at this learning rate swing its perplexity.
    "QUARK_UNLEARN_EXPLORE_PROMPTS": "0",
    "QUARK_EVAL_PROMPTS": "8",
    "QUARK_EVAL_SAMPLES": "2",
    "QUARK_EVAL_FRACTION": "0.2",
    "QUARK_GATE_REWARD_TOLERANCE": "0.05",
    "QUARK_GATE_MAX_PERPLEXITY_RISE": "1.0",
    # The toy model at lr 1e-2 drifts ~0.3-1 nats/token from the original in one job; the
    # default cap (2.0) is sized for the real model at its default lr (docs/gate.md).
    "QUARK_GATE_MAX_KL": "10",
    "QUARK_JOB_LOCK_TTL_S": "6",
    "QUARK_DEFAULT_MAX_NEW_TOKENS": "12",
}


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache: Path) -> Path:
    """The toy-language tiny model (see toy_model.py): the base of every e2e stack."""
    return save_toy_model(tmp_path_factory.mktemp("toy-model") / "toy", tokenizer_cache)


@pytest.fixture(scope="module")
def loop_stack(
    redis_client: redis.Redis, toy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Server + worker on the shared Redis under a fresh key prefix."""
    workdir = tmp_path_factory.mktemp("loop")
    with shared_redis_stack(redis_client, toy_model_dir, workdir, FAST_JOBS) as stack:
        stack.start_worker()
        stack.start_server()
        yield stack


@contextmanager
def shared_redis_stack(
    redis_client: redis.Redis, model: Path, workdir: Path, overrides: dict[str, str]
) -> Iterator[Stack]:
    """A stack on the shared Redis under a fresh key prefix (no process started yet); its
    processes are stopped and its keys dropped afterwards."""
    prefix = f"qs-e2e-{uuid.uuid4().hex[:8]}"
    stack = Stack(workdir, service_env(model, REDIS_URL, prefix, workdir / "data", **overrides))
    try:
        yield stack
    finally:
        stack.stop()
        drop_keys(redis_client, prefix)


@pytest.fixture
def on_failure_logs(request: pytest.FixtureRequest) -> Iterator[list[Stack]]:
    """Stacks registered here print their process logs when the test fails."""
    stacks: list[Stack] = []
    yield stacks
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for stack in stacks:
            print(stack.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
