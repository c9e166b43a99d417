"""Between the routes and the engine: validate against the loaded model, tokenize, submit,
collect events, and log finished completions to the pool."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from app.decoding import RowSampling
from app.engine import (
    Engine,
    EngineError,
    Event,
    QueueFull,
    RequestHandle,
    RequestSpec,
)
from app.errors import APIError, bad_request
from app.metrics import Metrics
from app.pool_logger import PoolLogger
from app.schemas import RewardUsed
from app.serving_model import LoadedModel
from quark.pool import PoolRecord
from quark.service.settings import ServiceSettings


@dataclass
class GenerationInput:
    """What to generate, whichever endpoint it came from (``prompt`` = the model's text)."""

    prompt: str
    endpoint: str
    reward: str | int = "top"
    n: int = 1
    max_new_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    log: bool = True
    prompt_param: str = "prompt"  # request fields named in errors
    max_tokens_param: str = "max_new_tokens"


@dataclass
class Completed:
    index: int
    text: str
    finish_reason: str
    tokens: int


def reward_choice(model: LoadedModel, requested: str | int) -> tuple[int | None, RewardUsed]:
    """Quantile to condition on and how to report it; raises 400 for an unknown quantile."""
    tokens = model.qm.reward_tokens
    if tokens is None or requested == "none":
        return None, RewardUsed(requested=requested, quantile=None, token=None, applied=False)
    try:
        quantile = tokens.resolve(requested)
    except ValueError as exc:
        raise bad_request(str(exc), param="reward") from exc
    assert quantile is not None
    used = RewardUsed(
        requested=requested, quantile=quantile, token=tokens.tokens[quantile], applied=True
    )
    return quantile, used


class Generation:
    """One submitted request: iterate its events, or await all its completions."""

    def __init__(
        self,
        service: GenerationService,
        handle: RequestHandle,
        inp: GenerationInput,
        prompt_tokens: int,
    ) -> None:
        self.service = service
        self.handle = handle
        self.inp = inp
        self.id = uuid.uuid4().hex
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.texts = [""] * inp.n
        self.done: dict[int, Completed] = {}

    @property
    def model_version(self) -> str:
        return self.handle.model.version

    @property
    def reward(self) -> RewardUsed:
        return reward_choice(self.handle.model, self.inp.reward)[1]

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.done.values())

    def cancel(self) -> None:
        self.handle.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """Events until every completion finished; leaving early cancels the rest."""
        first = True
        try:
            while len(self.done) < self.inp.n:
                item = await self.handle.queue.get()
                if isinstance(item, EngineError):
                    raise _engine_error(item, self.service.settings)
                for event in item:
                    if first:
                        first = False
                        elapsed = time.perf_counter() - self.started
                        self.service.metrics.ttft.labels(endpoint=self.inp.endpoint).observe(
                            elapsed
                        )
                    self.texts[event.index] += event.delta
                    if event.finish_reason is not None:
                        self._finish(event)
                    yield event
        finally:
            if len(self.done) < self.inp.n:
                self.handle.cancel()

    async def result(self) -> list[Completed]:
        async for _ in self.events():
            pass
        return [self.done[i] for i in range(self.inp.n)]

    def _finish(self, event: Event) -> None:
        assert event.finish_reason is not None
        done = Completed(event.index, self.texts[event.index], event.finish_reason, event.tokens)
        self.done[event.index] = done
        if self.inp.log and self.service.pool_logger.enabled:
            self.service.pool_logger.log(self._record(done))

    def _record(self, done: Completed) -> PoolRecord:
        reward = self.reward
        spec = self.handle.spec
        sampling = spec.samplings[done.index]
        return PoolRecord(
            prompt=self.inp.prompt,
            completion=done.text,
            metadata={
                "request_id": self.id,
                "model_version": self.model_version,
                "reward_quantile": reward.quantile,
                "reward_token": reward.token,
                "sampling": {
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "max_new_tokens": sampling.max_new_tokens,
                    "seed": sampling.seed,
                    "stop": list(spec.stop),
                    "n": self.inp.n,
                    "index": done.index,
                },
                "created_at": datetime.now(UTC).isoformat(),
                "endpoint": self.inp.endpoint,
                "finish_reason": done.finish_reason,
                "completion_tokens": done.tokens,
            },
        )


def _engine_error(error: EngineError, settings: ServiceSettings) -> APIError:
    if isinstance(error, QueueFull) or error.retryable:
        return APIError(
            503,
            str(error),
            code="overloaded" if isinstance(error, QueueFull) else "unavailable",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    return APIError(500, str(error), code="generation_failed")


class GenerationService:
    """Checks and submits generations; shared by /generate and the OpenAI routes."""

    def __init__(
        self, settings: ServiceSettings, engine: Engine, pool_logger: PoolLogger, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.pool_logger = pool_logger
        self.metrics = metrics

    def current_model(self) -> LoadedModel:
        model = self.engine.model
        if model is None:
            reason = self.engine.load_error
            message = f"the model failed to load ({reason})" if reason else "the model is loading"
            raise APIError(
                503,
                f"{message}; retry shortly (GET /readyz tells when it is ready)",
                code="model_not_ready",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return model

    async def start(self, inp: GenerationInput) -> Generation:
        """Validate and submit; raises APIError (400 bad input, 503 busy/not ready)."""
        model = self.current_model()
        self._check_limits(inp)
        _, _ = reward_choice(model, inp.reward)  # 400 for an unknown quantile, early
        text_ids = await asyncio.to_thread(self._tokenize, model, inp.prompt)
        prompt_ids = _prefix(model, inp.reward) + text_ids
        max_new = inp.max_new_tokens or self.settings.default_max_new_tokens
        self._check_length(inp, model, len(text_ids), len(prompt_ids), max_new)
        base_seed = inp.seed if inp.seed is not None else secrets.randbits(62)
        samplings = [
            RowSampling(max_new, inp.temperature, inp.top_p, base_seed + i) for i in range(inp.n)
        ]
        spec = RequestSpec(
            prompt_ids,
            model,
            samplings,
            tuple(inp.stop),
            rebuild=lambda m: _prefix(m, inp.reward) + text_ids,
        )
        try:
            handle = self.engine.submit(spec)
        except EngineError as exc:
            raise _engine_error(exc, self.settings) from exc
        return Generation(self, handle, inp, len(prompt_ids))

    @staticmethod
    def _tokenize(model: LoadedModel, text: str) -> list[int]:
        return list(model.qm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _check_limits(self, inp: GenerationInput) -> None:
        s = self.settings
        if inp.n > s.max_n:
            raise bad_request(f"n={inp.n} is above this server's limit of {s.max_n}", "n")
        if inp.max_new_tokens is not None and inp.max_new_tokens > s.max_new_tokens_limit:
            raise bad_request(
                f"{inp.max_tokens_param}={inp.max_new_tokens} is above this server's limit of "
                f"{s.max_new_tokens_limit}",
                inp.max_tokens_param,
            )
        if not inp.prompt:
            raise bad_request("the prompt is empty: give some text", inp.prompt_param)

    def _check_length(
        self, inp: GenerationInput, model: LoadedModel, text: int, prompt: int, max_new: int
    ) -> None:
        if text == 0:
            raise bad_request("the prompt has no tokens: give some text", inp.prompt_param)
        limit = min(self.settings.max_prompt_tokens, model.context - 1)
        if prompt > limit:
            raise APIError(
                400,
                f"the prompt is {prompt} tokens long (reward token included); this server "
                f"accepts at most {limit}: shorten it",
                param=inp.prompt_param,
                code="context_length_exceeded",
            )
        if prompt + max_new > model.context:
            raise APIError(
                400,
                f"prompt ({prompt} tokens) + {inp.max_tokens_param} ({max_new}) exceeds the "
                f"model's context of {model.context} tokens: shorten the prompt or lower "
                f"{inp.max_tokens_param}",
                param=inp.max_tokens_param,
                code="context_length_exceeded",
            )

    def status(self) -> dict[str, Any]:
        model = self.engine.model
        return {
            "model_loaded": model is not None,
            "model_version": model.version if model else None,
            "load_error": self.engine.load_error,
            **self.engine.stats(),
        }


def _prefix(model: LoadedModel, requested: str | int) -> list[int]:
    quantile, _ = reward_choice(model, requested)
    return model.qm.prefix_ids(quantile)
