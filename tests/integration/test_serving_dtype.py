"""QUARK_DTYPE=bfloat16 on a real server (tiny model): it serves, every version it loads,
at start and on hot swap, is loaded in bfloat16, and its text is what offline decoding
of the same weights in bfloat16 produces (same seed)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch

from app.decoding import RowSampling, decode_text
from quark.models import QuarkModel, load_model
from quark.service.store import ModelStore, RedisVersionPointer

from .conftest import ADMIN_TOKEN, Server, start_server

BF16 = {"QUARK_DTYPE": "bfloat16"}
PROMPT, SEED = "Once upon a time", 7


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"qs-dtype-{uuid.uuid4().hex[:8]}"
    yield prefix
    keys = list(redis_client.scan_iter(f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)


def _generate(server: Server) -> dict[str, object]:
    body = {"prompt": PROMPT, "reward": "top", "max_new_tokens": 10, "seed": SEED, "log": False}
    answer = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result: dict[str, object] = answer.json()
    return result


def _offline_text(model_dir: Path) -> str:
    qm = load_model(model_dir, device="cpu", dtype=torch.bfloat16)
    [(text, _)] = decode_text(qm, PROMPT, 0, [RowSampling(10, 1.0, 1.0, SEED)])
    return text


def _completion(answer: dict[str, object]) -> str:
    completions = answer["completions"]
    assert isinstance(completions, list)
    return str(completions[0]["text"])


def test_a_pinned_server_serves_in_bfloat16(
    tiny_model_dir: Path, tmp_path: Path, prefix: str
) -> None:
    server = start_server(tiny_model_dir, tmp_path, prefix, **BF16)
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=5).json()
        assert ready["dtype"] == "bfloat16", ready
        assert _completion(_generate(server)) == _offline_text(tiny_model_dir)
        assert "serving in bfloat16 (QUARK_DTYPE=bfloat16" in server.log_tail(20_000)
    finally:
        server.stop()


def test_hot_swapped_versions_load_in_bfloat16(
    tiny_qm: QuarkModel,
    tiny_model_dir: Path,
    tmp_path: Path,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    store = ModelStore(tmp_path / "data" / "models", RedisVersionPointer(redis_client, prefix))
    store.activate(store.publish(tiny_qm, {"parent": None}))
    server = start_server(
        tiny_model_dir,
        tmp_path,
        prefix,
        QUARK_WATCH_VERSIONS="1",
        QUARK_WATCHER_POLL_S="1",
        **BF16,
    )
    try:
        ready = httpx.get(f"{server.url}/readyz", timeout=5).json()
        assert (ready["serving"], ready["dtype"]) == ("v0000", "bfloat16"), ready
        with torch.no_grad():  # another version: different weights, hence different text
            tiny_qm.model.get_input_embeddings().weight.mul_(1.5)
        store.activate(store.publish(tiny_qm, {"parent": "v0000"}))
        deadline = time.monotonic() + 60
        while (answer := _generate(server))["model_version"] != "v0001":
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/readyz", timeout=5).json()["dtype"] == "bfloat16"
        assert _completion(answer) == _offline_text(store.path("v0001"))
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        models = httpx.get(f"{server.url}/admin/models", headers=headers, timeout=30).json()
        assert models["serving"] == "v0001"
    finally:
        server.stop()
