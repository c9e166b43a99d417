"""Request schemas and error objects for input that once made a 500 (issue 9)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from app.errors import APIError, validation_error
from app.main import create_app
from app.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParams,
    GenerateRequest,
    lone_surrogate,
)
from quark.service.settings import ServiceSettings


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (GenerateRequest, {"prompt": "x"}),
        (GenerateParams, {"prompt": "x"}),
        (CompletionRequest, {"prompt": "x"}),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]}),
    ],
)
def test_stop_null_is_no_stop_strings(model: Any, body: dict[str, Any]) -> None:
    assert model.model_validate({**body, "stop": None}).stop is None
    with pytest.raises(ValidationError):  # the bound still holds for a list
        model.model_validate({**body, "stop": ["a", "b", "c", "d", "e"]})


@pytest.mark.parametrize(
    ("value", "found"),
    [
        ("fine \U0001f600", None),
        ({"a": ["x", {"b": "y"}]}, None),
        ("a\ud800", ("the value", "(\\ud800) at character 1")),
        ({"prompt": ["x", "ab\udfff"]}, ("prompt[1]", "(\\udfff) at character 2")),
        ({"m": [{"c\udc00": 1}]}, ("m[0].c\\udc00", "in its name")),
    ],
)
def test_lone_surrogate_names_the_field(value: Any, found: tuple[str, str] | None) -> None:
    assert lone_surrogate(value) == found


def test_lone_surrogate_walks_deep_nesting_without_recursion() -> None:
    deep: Any = "\ud800"
    for _ in range(5000):
        deep = [deep]
    found = lone_surrogate({"x": deep})
    assert found is not None and found[0].startswith("x[0][0]")


def test_a_surrogate_is_a_400_with_the_field_as_param() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\ud800"}]}]}
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(info.value.errors())
    assert (error.status, error.type, error.code) == (
        400,
        "invalid_request_error",
        "invalid_unicode",
    )
    assert error.param == "messages[0].content[0].text"
    assert error.message.startswith("messages[0].content[0].text holds a lone UTF-16 surrogate")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (409, "conflict_error"),
        (413, "invalid_request_error"),
        (415, "invalid_request_error"),  # any other 4xx
        (422, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (502, "server_error"),
        (503, "service_unavailable"),
    ],
)
def test_error_type_follows_the_status(status: int, kind: str) -> None:
    assert APIError(status, "x").body()["error"]["type"] == kind


def test_openapi_documents_the_error_object_not_a_422() -> None:
    app = create_app(ServiceSettings(insecure_dev=True, watch_versions=False))
    paths = app.openapi()["paths"]
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, method in [
        ("/generate", "get"),
        ("/generate", "post"),
        ("/v1/completions", "post"),
        ("/v1/chat/completions", "post"),
    ]:
        responses = paths[path][method]["responses"]
        assert "422" not in responses  # bad input is a 400; FastAPI's 422 was never sent
        for status in ("400", "401", "413", "500", "503", "4XX"):
            assert responses[status]["content"]["application/json"]["schema"] == ref
