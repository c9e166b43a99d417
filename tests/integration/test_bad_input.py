"""Bad input gets a clear 4xx JSON error (never a 500), and authentication is enforced."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import ADMIN_TOKEN, API_KEY, Server

LONG_PROMPT = "hello " * 600  # ~600 tokens: over the tiny model's 512-token context


def _error(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "reward": "best"}, "reward"),
        ({"prompt": "x", "reward": 7}, "reward"),  # the model has quantiles 0..4
        ({"prompt": "x", "reward": -1}, "reward"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 5}, "n"),  # QUARK_MAX_N=4
        ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": "x", "max_new_tokens": 401}, "max_new_tokens"),  # limit 400
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "max_tokens": 5}, "max_tokens"),  # a typo of max_new_tokens
        ({}, "prompt"),
    ],
)
def test_generate_rejects_bad_fields(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    assert _error(client.post("/generate", json=body))["param"] == param


def test_prompt_longer_than_the_context(client: httpx.Client) -> None:
    error = _error(client.post("/generate", json={"prompt": LONG_PROMPT}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "tokens" in error["message"]
    fits = "hello " * 500
    error = _error(client.post("/generate", json={"prompt": fits, "max_new_tokens": 100}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_new_tokens"


@pytest.mark.parametrize(
    ("content", "code"),
    [(b'{"prompt": "x",', "invalid_json"), (b"[1, 2]", "invalid_value"), (b"", "missing_field")],
)
def test_malformed_bodies(client: httpx.Client, content: bytes, code: str) -> None:
    headers = {"Content-Type": "application/json"}
    error = _error(client.post("/generate", content=content, headers=headers))
    assert error["code"] == code


def test_get_generate_query_errors(client: httpx.Client) -> None:
    assert _error(client.get("/generate", params={"prompt": "x", "n": "abc"}))["param"] == "n"
    assert _error(client.get("/generate"))["param"] == "prompt"
    assert _error(client.get("/generate", params={"prompt": "x", "rewrd": "top"}))["param"]


def test_oversized_bodies_get_413(client: httpx.Client) -> None:
    big = {"prompt": "x" * 30_000}  # QUARK_MAX_BODY_BYTES=20000
    assert _error(client.post("/generate", json=big), 413)["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    response = client.post(
        "/generate", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert _error(response, 413)["code"] == "body_too_large"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": "quark-tiny", "prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 401}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "warm"}, "temperature"),
        ("/v1/completions", {"prompt": LONG_PROMPT}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
    ],
)
def test_openai_endpoints_use_the_openai_error_shape(
    client: httpx.Client, path: str, body: dict[str, Any], param: str | None
) -> None:
    error = _error(client.post(path, json=body))
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    else:
        assert error["param"]


def test_openai_malformed_json(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert _error(response)["code"] == "invalid_json"


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert _error(client.get("/nope"), 404)["type"] == "not_found_error"
    assert _error(client.delete("/generate"), 405)


def test_api_keys(server: Server) -> None:
    body = {"prompt": "x", "max_new_tokens": 2}
    missing = httpx.post(f"{server.url}/generate", json=body)
    assert _error(missing, 401)["code"] == "missing_api_key"
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = httpx.post(f"{server.url}/v1/completions", json=body, headers=_bearer("nope"))
    assert _error(wrong, 401)["code"] == "invalid_api_key"
    ok = httpx.post(f"{server.url}/generate", json=body, headers=_bearer("second-key"))
    assert ok.status_code == 200
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{server.url}{open_path}").status_code == 200


def test_admin_needs_the_admin_token(server: Server) -> None:
    url = f"{server.url}/admin/logging"
    assert _error(httpx.get(url), 401)["code"] == "missing_token"
    assert _error(httpx.get(url, headers=_bearer(API_KEY)), 401)["code"] == "invalid_token"
    assert httpx.get(url, headers=_bearer(ADMIN_TOKEN)).status_code == 200
    bad = httpx.put(url, json={"enabled": "no"}, headers=_bearer(ADMIN_TOKEN))
    assert _error(bad)["param"] == "enabled"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
