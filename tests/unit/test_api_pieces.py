"""Pure pieces of the HTTP layer: request schemas, error messages, reward choice, auth."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.auth import token_matches
from app.errors import APIError, validation_error
from app.main import InsecureConfiguration, create_app
from app.schemas import ChatCompletionRequest, CompletionRequest, GenerateParams, GenerateRequest
from app.service import reward_choice
from app.serving_model import wrap_model
from quark.models import QuarkModel
from quark.service.settings import ServiceSettings
from testkit.tiny_model import build_tiny_model


@pytest.mark.parametrize(
    ("given", "expected"),
    [("top", "top"), ("BOTTOM", "bottom"), (" none ", "none"), (3, 3), ("2", 2), (0, 0)],
)
def test_reward_selector_normalized(given: object, expected: object) -> None:
    assert GenerateRequest.model_validate({"prompt": "x", "reward": given}).reward == expected


@pytest.mark.parametrize("bad", ["best", -1, "-1", True, 1.5, None])
def test_reward_selector_rejects_with_the_allowed_values(bad: object) -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"prompt": "x", "reward": bad})
    assert info.value.errors()[0]["loc"] == ("reward",)


def test_post_body_is_strict_get_query_is_converted() -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "x", "n": "2"})
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"prompt": "x", "stream": "yes"})
    params = GenerateParams.model_validate({"prompt": "x", "n": "2", "stream": "true"})
    assert (params.n, params.stream) == (2, True)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "max_new_tokens": 0},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "temperature": -0.1},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
        {"prompt": "x", "typo": 1},
        {"prompt": 5},
    ],
)
def test_generate_request_bounds(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate(body)


def test_openai_requests_ignore_unknown_fields_but_check_types() -> None:
    req = CompletionRequest.model_validate({"prompt": "x", "metadata": {"a": 1}, "stop": "\n"})
    assert req.stop == ["\n"] and req.reward == "top"
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "max_tokens": "5"})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    )
    assert chat.messages[0].text() == "hi"


def test_validation_error_messages_name_the_field() -> None:
    try:
        GenerateRequest.model_validate({"prompt": "x", "n": "two"})
    except ValidationError as exc:
        error = validation_error([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
    assert isinstance(error, APIError)
    body = error.body()["error"]
    assert error.status == 400 and body["param"] == "n" and body["message"].startswith("n: ")
    json_error = validation_error([{"type": "json_invalid", "loc": ("body", 3), "ctx": {}}])
    assert json_error.code == "invalid_json"


def test_reward_choice_with_and_without_reward_tokens(
    tiny_qm: QuarkModel, tokenizer_cache: Path
) -> None:
    model = wrap_model(tiny_qm, "v")
    assert reward_choice(model, "top")[0] == 0
    quantile, used = reward_choice(model, "bottom")
    assert quantile == 4 and used.token == "<|quark_reward_4|>" and used.applied
    assert reward_choice(model, "none")[1].applied is False
    with pytest.raises(APIError) as info:
        reward_choice(model, 9)
    assert info.value.param == "reward"
    base = wrap_model(build_tiny_model(tokenizer_cache, num_quantiles=None), "base")
    for requested in ("top", "bottom", 3):
        quantile, used = reward_choice(base, requested)
        assert quantile is None and used.token is None and not used.applied


def test_token_matches_is_exact() -> None:
    assert token_matches("abc", ["x", "abc"])
    assert not token_matches("ab", ["abc"])
    assert not token_matches("abc", [])


def test_app_refuses_to_start_without_admin_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(InsecureConfiguration):
        create_app(ServiceSettings(data_dir=tmp_path, admin_token=""))
    create_app(ServiceSettings(data_dir=tmp_path, admin_token="", insecure_dev=True))
    assert "OPEN" in caplog.text


def test_model_version_label(tiny_model_dir: Path, tiny_qm: QuarkModel) -> None:
    from app.serving_model import model_version

    tiny_qm.metadata.pop("version", None)
    label = model_version(tiny_qm, tiny_model_dir)
    assert len(label) == 12 and int(label, 16) >= 0  # a short hash of the weights
    assert model_version(tiny_qm, tiny_model_dir) == label
    assert model_version(tiny_qm, None) == "base"
    tiny_qm.metadata["version"] = "v0007"
    assert model_version(tiny_qm, tiny_model_dir) == "v0007"
