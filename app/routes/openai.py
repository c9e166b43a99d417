"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

The reward is chosen with an extra body field ``reward`` (default ``top``; with the
``openai`` client: ``extra_body={"reward": "none"}``), and responses carry two extra
fields, ``model_version`` and ``reward``. Errors use the OpenAI error object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.auth import require_api_key
from app.deps import ServiceDep, SettingsDep
from app.engine import Event
from app.errors import APIError, bad_request, error_responses
from app.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    OpenAIRequestBase,
    OpenAIUsage,
)
from app.service import Generation, GenerationInput, GenerationService
from app.streaming import sse, sse_response, unless_disconnected
from quark.service.settings import ServiceSettings

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])

_GENERATION_ERRORS = error_responses(400, 401, 404, 413, 500, 503, "4XX")


def _check_model(body: OpenAIRequestBase, service: GenerationService) -> str:
    """The model name to report; 404 for a model this server does not serve."""
    name = service.settings.served_model_name
    current = service.current_model()
    if body.model not in (None, name, current.version):
        raise APIError(
            404,
            f"model {body.model!r} is not served here: use {name!r} (see GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    return name


def _check_unsupported(checks: dict[str, bool]) -> None:
    for param, unsupported in checks.items():
        if unsupported:
            raise bad_request(
                f"'{param}' is not supported by this server; leave it out",
                param,
                "unsupported_parameter",
            )


def _common(
    body: OpenAIRequestBase, endpoint: str, prompt: str, max_tokens: int | None, prompt_param: str
) -> GenerationInput:
    _check_unsupported(
        {
            "presence_penalty": bool(body.presence_penalty),
            "frequency_penalty": bool(body.frequency_penalty),
            "logit_bias": bool(body.logit_bias),
        }
    )
    return GenerationInput(
        prompt=prompt,
        endpoint=endpoint,
        reward=body.reward,
        n=body.n,
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop or [],
        log=body.log,
        prompt_param=prompt_param,
        max_tokens_param="max_tokens",
    )


def _usage(gens: list[Generation]) -> OpenAIUsage:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(g.completion_tokens for g in gens)
    return OpenAIUsage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def _start_all(service: GenerationService, inputs: list[GenerationInput]) -> list[Generation]:
    """Submit every prompt; if one is refused, cancel those already queued."""
    gens: list[Generation] = []
    try:
        for inp in inputs:
            gens.append(await service.start(inp))
    except BaseException:
        for gen in gens:
            gen.cancel()
        raise
    return gens


async def _stream(
    gens: list[Generation], chunk: dict[str, Any], include_usage: bool, chat: bool
) -> AsyncIterator[bytes]:
    """Merge every generation's events into OpenAI chunks (choice index = prompt * n + i)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(k: int, gen: Generation) -> None:
        try:
            async for event in gen.events():
                await queue.put((k, event))
        except APIError as exc:
            await queue.put((k, exc))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.create_task(pump(k, g)) for k, g in enumerate(gens)]
    try:
        if chat:
            for k, gen in enumerate(gens):
                for i in range(gen.inp.n):
                    yield sse(
                        _chunk(
                            chunk,
                            k * gen.inp.n + i,
                            {"role": "assistant", "content": ""},
                            None,
                            chat,
                        )
                    )
        async for k, event in _drain(queue, len(tasks)):
            if event.delta or event.finish_reason is not None:
                yield sse(_event_chunk(chunk, k * gens[k].inp.n + event.index, event, chat))
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": _usage(gens).model_dump()})
    except APIError as exc:
        yield sse(exc.body())
    finally:
        for task in tasks:
            task.cancel()
    yield sse("[DONE]")


async def _drain(
    queue: asyncio.Queue[tuple[int, Any]], producers: int
) -> AsyncIterator[tuple[int, Any]]:
    finished = 0
    while finished < producers:
        k, item = await queue.get()
        if item is None:
            finished += 1
        elif isinstance(item, APIError):
            raise item
        else:
            yield k, item


def _event_chunk(base: dict[str, Any], index: int, event: Event, chat: bool) -> dict[str, Any]:
    if not chat:
        return _chunk(base, index, event.delta, event.finish_reason, chat)
    delta = {"content": event.delta} if event.delta else {}
    return _chunk(base, index, delta, event.finish_reason, chat)


def _chunk(
    base: dict[str, Any], index: int, content: Any, finish: str | None, chat: bool
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
    choice["delta" if chat else "text"] = content
    return {**base, "choices": [choice]}


def _stream_base(gens: list[Generation], name: str, obj: str) -> dict[str, Any]:
    return {
        "id": gens[0].id,
        "object": obj,
        "created": gens[0].created,
        "model": name,
        "model_version": gens[0].model_version,
        "reward": gens[0].reward.model_dump(),
    }


@router.post("/completions", response_model=CompletionResponse, responses=_GENERATION_ERRORS)
async def completions(
    request: Request, body: CompletionRequest, service: ServiceDep, settings: SettingsDep
) -> CompletionResponse | StreamingResponse:
    """OpenAI text completions; a list of prompts gives n choices per prompt, in order."""
    name = _check_model(body, service)
    _check_unsupported(
        {
            "echo": bool(body.echo),
            "logprobs": body.logprobs is not None,
            "best_of": (body.best_of or 1) > 1,
            "suffix": body.suffix is not None,
        }
    )
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    _check_prompt_list(prompts, settings)
    inputs = [
        _common(
            body,
            "/v1/completions",
            p,
            body.max_tokens,
            "prompt" if isinstance(body.prompt, str) else f"prompt[{k}]",
        )
        for k, p in enumerate(prompts)
    ]
    gens = await _start_all(service, inputs)
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        base = _stream_base(gens, name, "text_completion")
        base["id"] = f"cmpl-{gens[0].id}"
        return sse_response(_stream(gens, base, include, chat=False))
    try:
        results = await unless_disconnected(request, asyncio.gather(*(g.result() for g in gens)))
    except BaseException:
        for gen in gens:  # one prompt failed or the client left: stop the others too
            gen.cancel()
        raise
    choices = [
        CompletionChoice(index=k * g.inp.n + c.index, text=c.text, finish_reason=c.finish_reason)
        for k, (g, done) in enumerate(zip(gens, results, strict=True))
        for c in done
    ]
    return CompletionResponse(
        id=f"cmpl-{gens[0].id}",
        created=gens[0].created,
        model=name,
        choices=choices,
        usage=_usage(gens),
        model_version=gens[0].model_version,
        reward=gens[0].reward,
    )


def _check_prompt_list(prompts: list[str], settings: ServiceSettings) -> None:
    if not prompts:
        raise bad_request("prompt is an empty list: give at least one prompt", "prompt")
    if len(prompts) > settings.max_batch_size:
        raise bad_request(
            f"{len(prompts)} prompts in one request; at most "
            f"{settings.max_batch_size} (QUARK_MAX_BATCH_SIZE)",
            "prompt",
        )


async def _chat_prompt(body: ChatCompletionRequest, service: GenerationService) -> str:
    tokenizer = service.current_model().qm.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", "messages")
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    try:
        text = await asyncio.to_thread(
            tokenizer.apply_chat_template, messages, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja raises for conversations the template refuses
        raise bad_request(f"the chat template refused these messages: {exc}", "messages") from exc
    return str(text)


@router.post(
    "/chat/completions", response_model=ChatCompletionResponse, responses=_GENERATION_ERRORS
)
async def chat_completions(
    request: Request, body: ChatCompletionRequest, service: ServiceDep
) -> ChatCompletionResponse | StreamingResponse:
    """OpenAI chat completions, rendered with the model's chat template."""
    name = _check_model(body, service)
    _check_unsupported(
        {
            "logprobs": bool(body.logprobs),
            "tools": bool(body.tools),
            "response_format": (body.response_format or {"type": "text"}).get("type") != "text",
        }
    )
    prompt = await _chat_prompt(body, service)
    max_tokens = body.max_completion_tokens or body.max_tokens
    gen = await service.start(_common(body, "/v1/chat/completions", prompt, max_tokens, "messages"))
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        base = _stream_base([gen], name, "chat.completion.chunk")
        base["id"] = f"chatcmpl-{gen.id}"
        return sse_response(_stream([gen], base, include, chat=True))
    done = await unless_disconnected(request, gen.result())
    choices = [
        ChatChoice(
            index=c.index, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason
        )
        for c in done
    ]
    return ChatCompletionResponse(
        id=f"chatcmpl-{gen.id}",
        created=gen.created,
        model=name,
        choices=choices,
        usage=_usage([gen]),
        model_version=gen.model_version,
        reward=gen.reward,
    )


@router.get("/models", response_model=ModelList, responses=error_responses(401, 500))
async def models(service: ServiceDep, settings: SettingsDep) -> ModelList:
    """The one model this server serves (its id is QUARK_SERVED_MODEL_NAME)."""
    model = service.engine.model
    created = int(model.loaded_at) if model else int(time.time())
    card = ModelCard(
        id=settings.served_model_name,
        created=created,
        model_version=model.version if model else None,
    )
    return ModelList(data=[card])
