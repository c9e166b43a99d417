"""Input that once made a 500 (issue 9): ``"stop": null``, lone UTF-16 surrogates, and the
error type of a 409. Each answer is the error object with the right type, never a 500."""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx
import pytest

from .conftest import Server

CHAT = "/v1/chat/completions"


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def _post(client: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"prompt": "x", "max_new_tokens": 2}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2}),
        (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    ],
)
def test_stop_null_means_no_stop_strings(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    response = client.post(path, json={**body, "stop": None, "seed": 3})
    assert response.status_code == 200, response.text
    baseline = client.post(path, json={**body, "seed": 3})  # the same as leaving it out
    assert response.json()["usage"] == baseline.json()["usage"]


def _chat(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


SURROGATE = "a\ud800b"  # json.dumps writes it as the escape "a\ud800b"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/generate", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
        ("/v1/completions", {"prompt": ["fine", SURROGATE]}, "prompt[1]"),
        (CHAT, _chat(SURROGATE), "messages[0].content"),
        (CHAT, _chat([{"type": "text", "text": SURROGATE}]), "messages[0].content[0].text"),
        ("/v1/completions", {"prompt": "x", "stop": [SURROGATE]}, "stop[0]"),
    ],
)
@pytest.mark.parametrize("encoding", ["json-escape", "raw-bytes"])
def test_lone_surrogate_is_a_400_naming_the_field(
    client: httpx.Client, path: str, body: dict[str, Any], param: str, encoding: str
) -> None:
    content = json.dumps(body).encode()  # ensure_ascii: the surrogate as "\ud800"
    if encoding == "raw-bytes":  # the 3 bytes a UTF-8 encoder with surrogatepass writes
        content = content.replace(b"\\ud800", "\ud800".encode("utf-8", "surrogatepass"))
        assert b"\xed\xa0\x80" in content
    error = _error(_post(client, path, content), 400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_unicode"
    assert error["param"] == param
    assert "surrogate" in error["message"] and "UTF-8" in error["message"]


def test_a_valid_surrogate_pair_is_text(client: httpx.Client) -> None:
    body = b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert _post(client, "/v1/completions", body).status_code == 200


def test_conflict_has_its_own_error_type(server: Server, admin: httpx.Client) -> None:
    """Activating a version that fails verification is a 409 ``conflict_error``."""
    version = server.log_path.parent / "data" / "models" / "v0917"
    version.mkdir(parents=True)
    try:
        (version / "metadata.json").write_text(json.dumps({"version": "v0917", "files": {}}))
        error = _error(admin.post("/admin/models/v0917/activate"), 409)
    finally:
        shutil.rmtree(version)
    assert error["type"] == "conflict_error"
    assert (error["code"], error["param"]) == ("version_corrupt", "version")
