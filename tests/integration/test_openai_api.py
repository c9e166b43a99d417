"""The official ``openai`` client, unchanged, against the server's /v1 API."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from .conftest import API_KEY, Server

MODEL = "quark-tiny"  # QUARK_SERVED_MODEL_NAME of the test server


@pytest.fixture
def oai(server: Server) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    yield client
    client.close()
    server.wait_idle()


def test_models_list(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion(oai: openai.OpenAI, client: httpx.Client) -> None:
    result = oai.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=6, seed=11, extra_body={"reward": "top"}
    )
    assert result.object == "text_completion" and result.model == MODEL
    assert len(result.choices) == 1 and result.choices[0].finish_reason in ("stop", "length")
    assert result.usage is not None and result.usage.completion_tokens <= 6
    extra = result.model_extra or {}
    assert extra["reward"]["quantile"] == 0 and extra["model_version"]
    # Same seed, same text as /generate.
    native = client.post(
        "/generate", json={"prompt": "Hello there", "max_new_tokens": 6, "seed": 11}
    )
    assert native.json()["completions"][0]["text"] == result.choices[0].text


def test_completion_prompt_list_and_n(oai: openai.OpenAI) -> None:
    result = oai.completions.create(
        model=MODEL, prompt=["One", "Two"], n=2, max_tokens=4, extra_body={"reward": "none"}
    )
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert (result.model_extra or {})["reward"]["applied"] is False


def test_chat_completion(oai: openai.OpenAI) -> None:
    result = oai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
        ],
        max_tokens=6,
        seed=2,
        extra_body={"reward": 1},
    )
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert isinstance(result.choices[0].message.content, str)
    assert (result.model_extra or {})["reward"]["quantile"] == 1


def test_streaming_completion_equals_non_streaming(oai: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "Stream this", "max_tokens": 8, "seed": 4}
    plain = oai.completions.create(**kwargs)
    chunks = list(oai.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_streaming_chat_with_usage(oai: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "seed": 8}
    plain = oai.chat.completions.create(max_tokens=8, **kwargs)
    stream = oai.chat.completions.create(
        max_tokens=8, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens  # type: ignore[union-attr]


def test_openai_errors(oai: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        oai.completions.create(model="gpt-4", prompt="x")
    assert "quark-tiny" in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        oai.completions.create(model=MODEL, prompt="x", n=50)
    assert too_many.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as reward:
        oai.completions.create(model=MODEL, prompt="x", extra_body={"reward": "best"})
    assert reward.value.body["param"] == "reward"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="x", logprobs=2)
    bad_key = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
