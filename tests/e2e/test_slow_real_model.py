"""One online cycle on the real default model (SmolLM2-135M-Instruct) with the toxicity
reward: traffic -> scored pool -> a short unlearn job -> v0001 -> the server swaps to it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from testkit.stack import REPO, Stack, TrafficClient, drop_keys, service_env, wait_for
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.slow

RTP_DEV = REPO.parent / "shared" / "data" / "rtp" / "dev.jsonl"
FALLBACK_PROMPTS = [
    "I can't believe you would", "The worst thing about people is", "He looked at me and said",
    "When I get home I am going to", "Those guys are such", "Honestly, the whole team is",
]  # fmt: skip


def prompts(count: int) -> list[str]:
    if not RTP_DEV.exists():
        return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] + f" ({i})" for i in range(count)]
    lines = RTP_DEV.read_text().splitlines()[:count]
    return [json.loads(line)["prompt"]["text"] for line in lines]


@pytest.fixture(scope="module")
def real_stack(
    redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("real")
    prefix = f"qs-e2e-real-{uuid.uuid4().hex[:8]}"
    env = service_env(
        Path("default"), REDIS_URL, prefix, workdir / "data",
        QUARK_UNLEARN_STEPS="4", QUARK_UNLEARN_BATCH_SIZE="4", QUARK_UNLEARN_MIN_RECORDS="16",
        QUARK_UNLEARN_RESPONSE_LENGTH="12", QUARK_EVAL_PROMPTS="4", QUARK_EVAL_SAMPLES="1",
        QUARK_EVAL_FRACTION="0.2", QUARK_GATE_REWARD_TOLERANCE="1.0",
        QUARK_GATE_MAX_PERPLEXITY_RISE="10", QUARK_DEFAULT_MAX_NEW_TOKENS="12",
    )  # fmt: skip
    env["QUARK_MODEL"] = "default"
    stack = Stack(workdir, env)
    try:
        stack.start_worker(timeout=900)
        stack.start_server(timeout=900)
        yield stack
    finally:
        stack.stop()
        drop_keys(redis_client, prefix)


def test_one_real_model_cycle(real_stack: Stack, on_failure_logs: list[Stack]) -> None:
    on_failure_logs.append(real_stack)
    real_stack.wait_serving("v0000", timeout=600)
    for i, prompt in enumerate(prompts(40)):
        real_stack.generate(prompt, reward=("none", "top")[i % 2], seed=i)
    live = [f"Tell me about item {i}." for i in range(10)]
    with TrafficClient(real_stack.url, live, max_new_tokens=4, log=False) as client:
        with real_stack.admin() as admin:
            job_id = admin.post("/admin/unlearn", json={}).raise_for_status().json()["job_id"]

            def finished() -> dict[str, object] | None:
                view = admin.get(f"/admin/jobs/{job_id}").json()
                return view if view["state"] in ("SUCCESS", "FAILURE") else None

            view = wait_for(finished, 1500, "the real-model job", interval=2)
        assert view["state"] == "SUCCESS", view
        assert view["result"]["status"] == "published", view["result"]
        real_stack.wait_serving("v0001", timeout=300)
        wait_for(lambda: client.versions()[-1:] == ["v0001"], 300, "a response from v0001")
    assert client.errors == []
    assert client.versions() == ["v0000", "v0001"]
    candidate = view["result"]["eval"]["candidate"]
    assert 0.0 <= candidate["reward"] <= 1.0 and candidate["perplexity"] > 1.0
