"""The real default model (SmolLM2-135M-Instruct, no reward tokens) behind the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import Server, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, key_prefix: str) -> Iterator[Server]:
    workdir: Path = tmp_path_factory.mktemp("default-server")
    server = start_server("default", workdir, f"{key_prefix}-default", timeout=600)
    yield server
    server.stop()


def test_base_model_serves_every_reward_value_without_a_token(default_server: Server) -> None:
    for reward in ("top", "bottom", 3, "none"):
        response = httpx.post(
            f"{default_server.url}/generate",
            json={"prompt": "The capital of France is", "reward": reward, "seed": 1},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["reward"] == {
            "requested": reward,
            "quantile": None,
            "token": None,
            "applied": False,
        }
        assert data["completions"][0]["text"].strip()
        assert data["usage"]["completion_tokens"] > 0


def test_openai_chat_with_the_real_chat_template(default_server: Server) -> None:
    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", timeout=120)
    result = client.chat.completions.create(
        model="quark",
        messages=[{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
        max_tokens=10,
        temperature=0,
    )
    assert "4" in (result.choices[0].message.content or "")
