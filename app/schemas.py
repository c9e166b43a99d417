"""Request and response bodies of the HTTP API (pydantic; they generate /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

REWARD_HELP = (
    "Which reward token conditions the generation. 'top' = the best-reward quantile "
    "token (quantile 0, the 'unlearned' behaviour), 'bottom' = the worst-reward quantile "
    "(K-1), 'none' = no reward token (the plain model), an integer q = quantile q, "
    "ordered from 0 (best reward) to K-1 (worst). On a model without reward tokens every "
    "value generates without a token, and the response says so."
)
MAX_SEED = 2**63 - 1


def parse_reward(value: Any) -> str | int:
    """Normalize a reward selector: 'top'/'bottom'/'none' (any case) or a quantile >= 0."""
    if isinstance(value, bool):
        raise ValueError("reward must be 'top', 'bottom', 'none' or a quantile index, not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"reward quantile {value} is negative: quantiles count from 0 (best)")
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name in ("top", "bottom", "none"):
            return name
        if name.isdigit():
            return int(name)
    raise ValueError(
        f"unknown reward {value!r}: use 'top' (best-reward quantile), 'bottom' (worst), "
        "'none' (no reward token) or a quantile index 0..K-1 (0 = best reward)"
    )


def _stop_list(value: Any) -> Any:
    """OpenAI accepts one stop string or a list of them."""
    return [value] if isinstance(value, str) else value


def _json_path(parent: str, key: str | int) -> str:
    """Field names as the error messages write them: ``messages[0].content``."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else key


def _surrogate_at(text: str) -> int | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def lone_surrogate(data: Any) -> tuple[str, str] | None:
    """The first string of a parsed JSON value (or query) that is not valid Unicode, as
    ``(field, where in it)``, or None.

    JSON may escape a lone UTF-16 surrogate (``"\\ud800"``), and Python's JSON decoder
    also turns the raw bytes ``ED A0 80`` into one; neither can be encoded as UTF-8, so the
    tokenizer (and every UTF-8 consumer after it) would fail on them. Iterative: any
    nesting the JSON decoder accepted is walked without hitting the recursion limit."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            index = _surrogate_at(value)
            if index is not None:
                escaped = value[index].encode("unicode_escape").decode()
                return path or "the value", f"({escaped}) at character {index}"
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                name = str(key)
                if _surrogate_at(name) is not None:
                    shown = name.encode("utf-8", "backslashreplace").decode()
                    return _json_path(path, shown), "in its name"
                stack.append((_json_path(path, name), item))
        elif isinstance(value, list | tuple):
            stack.extend((_json_path(path, i), v) for i, v in reversed(list(enumerate(value))))
    return None


class UnicodeChecked(BaseModel):
    """Requests whose text reaches the tokenizer: every string in them must be valid
    Unicode. One check for /generate (GET and POST) and the OpenAI routes; a failure is a
    400 naming the field (``validation_error`` reads ``ctx["param"]``)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = lone_surrogate(data)
        if found is not None:
            field, where = found
            raise PydanticCustomError(
                "string_unicode",
                "{param} holds a lone UTF-16 surrogate {where}, which is not valid Unicode: "
                "send UTF-8 text, and escape a character outside the Basic Multilingual Plane "
                "as a complete surrogate pair (e.g. \\ud83d\\ude00)",
                {"param": field, "where": where},
            )
        return data


RewardSelector = Annotated[str | int, BeforeValidator(parse_reward)]
StopStrings = Annotated[
    # max_length sits on the list, not on the optional: pydantic applies a constraint on
    # ``list | None`` to None too and raises TypeError (a 500) for ``"stop": null``.
    Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None,
    BeforeValidator(_stop_list),
    Field(description="Up to 4 strings; generation stops before any of them. null = none."),
]


# -- errors ---------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong and how to fix it.")
    type: str = Field(
        description="invalid_request_error (400, 413, 422), authentication_error (401), "
        "permission_error (403), not_found_error (404), conflict_error (409), "
        "rate_limit_error (429), service_unavailable (503), server_error (other 5xx)."
    )
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="A machine-readable reason, e.g. invalid_value.")


class ErrorResponse(BaseModel):
    """Every error, on every endpoint (the OpenAI error object)."""

    error: ErrorDetail


# -- /generate ------------------------------------------------------------------------------
class GenerateParams(UnicodeChecked):
    """Fields of ``GET /generate`` (query string, types converted from text)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        min_length=1, description="Text to continue (non-empty; counted in tokens)."
    )
    reward: RewardSelector = Field("top", description=REWARD_HELP)
    n: int = Field(1, ge=1, description="Completions to sample independently (<= QUARK_MAX_N).")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens per completion (default QUARK_DEFAULT_MAX_NEW_TOKENS, at most "
        "QUARK_MAX_NEW_TOKENS_LIMIT); prompt + completion must fit the model's context.",
    )
    temperature: float = Field(
        1.0, ge=0, le=5, description="Sampling temperature; 0 = greedy (deterministic)."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass in (0, 1].")
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Makes sampling reproducible: completion i uses seed + i. Random if null.",
    )
    stream: bool = Field(False, description="Stream tokens as server-sent events.")
    log: bool = Field(
        True, description="Log the completions to the training pool (false = opt out)."
    )
    stop: StopStrings = None


class GenerateRequest(GenerateParams):
    """Body of ``POST /generate`` (JSON; types must match, unknown fields are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RewardUsed(BaseModel):
    requested: str | int = Field(description="The reward selector the request asked for.")
    quantile: int | None = Field(
        description="Quantile whose token was prepended (0 = best reward); null = none."
    )
    token: str | None = Field(description="The reward token prepended to the prompt, or null.")
    applied: bool = Field(
        description="Whether a reward token was used (false for 'none' or a model without any)."
    )


class GeneratedText(BaseModel):
    text: str = Field(description="The completion (without the prompt).")
    finish_reason: Literal["stop", "length"] = Field(
        description="'stop' = end of text or a stop string; 'length' = token budget reached."
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens fed to the model (reward token included).")
    completion_tokens: int = Field(description="Tokens generated, over all completions.")


class GenerateResponse(BaseModel):
    id: str = Field(description="Request id (also the pool records' request_id).")
    model_version: str = Field(description="Model version that generated the completions.")
    reward: RewardUsed = Field(description="Which reward token was used.")
    completions: list[GeneratedText] = Field(description="n completions, in index order.")
    usage: Usage = Field(description="Token counts.")


# -- OpenAI-compatible ------------------------------------------------------------------------
class OpenAIRequestBase(UnicodeChecked):
    # OpenAI clients send fields this server does not know (user, metadata, ...): ignore them;
    # types of known fields are checked strictly.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(None, description="Model id from GET /v1/models.")
    n: int = Field(1, ge=1, description="Choices to sample (<= QUARK_MAX_N).")
    temperature: float | None = Field(1.0, ge=0, le=5, description="0 = greedy.")
    top_p: float | None = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Reproducible sampling.")
    stream: bool | None = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="include_usage only.")
    stop: StopStrings = None
    reward: RewardSelector = Field("top", description=REWARD_HELP)
    log: bool = Field(True, description="Log to the training pool (false = opt out).")
    user: str | None = Field(None, description="Ignored.")
    presence_penalty: float | None = Field(None, description="Unsupported unless 0.")
    frequency_penalty: float | None = Field(None, description="Unsupported unless 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Unsupported.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send a last chunk with token usage.")


class CompletionRequest(OpenAIRequestBase):
    prompt: str | list[str] = Field(description="A prompt or a list of prompts (each non-empty).")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per choice.")
    echo: bool | None = Field(False, description="Unsupported (must be false).")
    logprobs: int | None = Field(None, description="Unsupported (must be null).")
    best_of: int | None = Field(None, description="Unsupported unless 1.")
    suffix: str | None = Field(None, description="Unsupported.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(description="Only text parts are supported.")
    text: str = Field(description="The text.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Who wrote the message ('developer' is treated as 'system')."
    )
    content: str | list[ContentPart] | None = Field(None, description="Text or text parts.")
    name: str | None = Field(None, description="Ignored.")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAIRequestBase):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens per choice.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens.")
    logprobs: bool | None = Field(None, description="Unsupported (must be false).")
    tools: list[Any] | None = Field(None, description="Unsupported.")
    response_format: dict[str, Any] | None = Field(None, description="Only type 'text'.")


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage | None = None
    model_version: str = Field(description="quark-serve extension: the model version used.")
    reward: RewardUsed = Field(description="quark-serve extension: the reward token used.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    model_version: str = Field(description="quark-serve extension: the model version used.")
    reward: RewardUsed = Field(description="quark-serve extension: the reward token used.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "quark-serve"
    model_version: str | None = Field(description="Active model version (null while loading).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- admin ------------------------------------------------------------------------------------
class LoggingSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool = Field(description="Whether completions are logged to the training pool.")


class LoggingState(LoggingSwitch):
    shared: bool = Field(
        True,
        description="Stored in Redis for every replica; false = applied to this replica only "
        "until Redis answers again.",
    )
