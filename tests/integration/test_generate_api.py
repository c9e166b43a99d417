"""The /generate contract against a real server (tiny model)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from app.decoding import RowSampling, decode_text
from quark.models import QuarkModel, load_model

from .conftest import API_KEY, Server


@pytest.fixture(scope="module")
def offline(tiny_model_dir: Path, server: Server) -> QuarkModel:
    """The same weights, loaded in the test process in the precision the server serves
    (QUARK_DTYPE=auto: bfloat16 on a CPU with native bf16, else float32)."""
    dtype = httpx.get(f"{server.url}/readyz").json()["dtype"]
    return load_model(tiny_model_dir, device="cpu", dtype=getattr(torch, dtype))


def test_health_ready_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["model_loaded"]
    assert ready["pool"]["redis"] == "up"
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "quark_requests_total",
        "quark_request_latency_seconds",
        "quark_time_to_first_token_seconds",
        "quark_generated_tokens_total",
        "quark_batch_size",
        "quark_queue_depth",
        "quark_model_version_info",
        "quark_pool_writes_total",
        "quark_spool_records",
        "quark_pool_dropped_records_total",
    ):
        assert name in metrics.text, name


def test_post_generate_contract(client: httpx.Client) -> None:
    body = {"prompt": "The weather is", "n": 2, "max_new_tokens": 6, "seed": 1, "reward": "top"}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert set(data) == {"id", "model_version", "reward", "completions", "usage"}
    assert data["reward"] == {
        "requested": "top",
        "quantile": 0,
        "token": "<|quark_reward_0|>",
        "applied": True,
    }
    assert len(data["completions"]) == 2
    for completion in data["completions"]:
        assert set(completion) == {"text", "finish_reason"}
        assert completion["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] == 1 + 3  # reward token + "The weather is"
    assert 0 < data["usage"]["completion_tokens"] <= 12
    assert data["completions"][0]["text"] != data["completions"][1]["text"]


def test_get_generate_with_defaults(client: httpx.Client) -> None:
    data = client.get("/generate", params={"prompt": "Hello", "seed": 3}).json()
    assert data["reward"]["requested"] == "top" and data["reward"]["quantile"] == 0
    assert data["usage"]["completion_tokens"] <= 8  # QUARK_DEFAULT_MAX_NEW_TOKENS
    again = client.post("/generate", json={"prompt": "Hello", "seed": 3}).json()
    assert again["completions"] == data["completions"]


@pytest.mark.parametrize(
    ("reward", "quantile"), [("bottom", 4), ("none", None), (2, 2), ("3", 3), ("TOP", 0)]
)
def test_reward_values(client: httpx.Client, reward: object, quantile: int | None) -> None:
    data = client.post("/generate", json={"prompt": "Hi", "reward": reward, "seed": 0}).json()
    assert data["reward"]["quantile"] == quantile
    assert data["reward"]["applied"] is (quantile is not None)
    assert data["usage"]["prompt_tokens"] == (1 if quantile is None else 2)


def test_server_output_equals_offline_generation(client: httpx.Client, offline: QuarkModel) -> None:
    """Invariant: same weights + same seed => same text over HTTP as offline."""
    body = {"prompt": "Once upon a time", "n": 2, "max_new_tokens": 12}
    body |= {"temperature": 0.9, "top_p": 0.95, "seed": 42, "reward": 1}
    served = client.post("/generate", json=body).json()["completions"]
    samplings = [RowSampling(12, 0.9, 0.95, seed=42 + i) for i in range(2)]
    expected = decode_text(offline, "Once upon a time", 1, samplings)
    assert [(c["text"], c["finish_reason"]) for c in served] == expected


def test_greedy_is_deterministic_without_seed(client: httpx.Client) -> None:
    body = {"prompt": "Greedy", "temperature": 0, "max_new_tokens": 6}
    first = client.post("/generate", json=body).json()["completions"]
    assert client.post("/generate", json=body).json()["completions"] == first


def test_stream_sends_deltas_then_the_full_response(client: httpx.Client) -> None:
    body = {"prompt": "Streaming", "stream": True, "n": 2, "seed": 5, "max_new_tokens": 6}
    with client.stream("POST", "/generate", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    done = parsed[-1]
    assert done["type"] == "done"
    texts = ["", ""]
    for event in parsed[:-1]:
        assert event["type"] == "delta"
        texts[event["index"]] += event["text"]
    assert texts == [c["text"] for c in done["response"]["completions"]]
    plain = client.post("/generate", json={**body, "stream": False}).json()
    assert plain["completions"] == done["response"]["completions"]


def test_concurrent_requests_share_decode_steps(server: Server) -> None:
    steps = server.metric("quark_batch_size_count")
    rows = server.metric("quark_batch_size_sum")

    async def run() -> list[int]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            body = {"prompt": "Batch me", "max_new_tokens": 30, "temperature": 0}
            tasks = [http.post("/generate", json=body) for _ in range(6)]
            return [r.status_code for r in await asyncio.gather(*tasks)]

    assert asyncio.run(run()) == [200] * 6
    step_delta = server.metric("quark_batch_size_count") - steps
    row_delta = server.metric("quark_batch_size_sum") - rows
    assert row_delta / step_delta > 2, "concurrent requests were not batched together"


def test_full_queue_answers_503_with_retry_after(server: Server) -> None:
    """8 rows decode, 8 wait; everything beyond is refused at once, not queued."""

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            body = {"prompt": "Fill the queue", "n": 4, "max_new_tokens": 400}
            tasks = [asyncio.create_task(http.post("/generate", json=body)) for _ in range(8)]
            done, pending = await asyncio.wait(tasks, timeout=20, return_when="FIRST_COMPLETED")
            await asyncio.sleep(0.5)
            done = {t for t in tasks if t.done()}
            for task in pending - done:
                task.cancel()  # closes the connection: the server cancels those rows
            return [t.result() for t in done]

    refused = asyncio.run(run())
    assert refused and all(r.status_code == 503 for r in refused)
    assert refused[0].headers["Retry-After"] == "1"
    assert refused[0].json()["error"]["code"] == "overloaded"
    server.wait_idle()


def test_client_disconnect_stops_generation(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "Long story", "max_new_tokens": 400, "n": 2}
    # Streaming: read two events, then hang up.
    with (
        httpx.Client(base_url=server.url, headers=headers, timeout=60) as http,
        http.stream("POST", "/generate", json={**body, "stream": True}) as response,
    ):
        assert next(response.iter_lines()).startswith("data: ")
    _assert_stops_quickly(server)
    # Non-streaming: the client times out and closes the connection.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/generate", json=body, headers=headers, timeout=0.5)
    _assert_stops_quickly(server)


def _assert_stops_quickly(server: Server) -> None:
    tokens = server.metric("quark_generated_tokens_total")
    server.wait_idle(timeout=5)
    time.sleep(0.2)
    stopped_at = server.metric("quark_generated_tokens_total")
    time.sleep(0.3)
    assert server.metric("quark_generated_tokens_total") == stopped_at
    assert stopped_at - tokens < 800  # far from the 2 x 400 tokens asked for
