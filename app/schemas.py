"""Request and response bodies of the HTTP API (pydantic; they generate /docs)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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


RewardSelector = Annotated[str | int, BeforeValidator(parse_reward)]
StopStrings = Annotated[
    list[Annotated[str, Field(min_length=1)]] | None,
    BeforeValidator(_stop_list),
    Field(max_length=4, description="Up to 4 strings; generation stops before any of them."),
]


# -- /generate ------------------------------------------------------------------------------
class GenerateParams(BaseModel):
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
class OpenAIRequestBase(BaseModel):
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
