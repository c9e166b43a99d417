"""``GET/POST /generate``: reward-conditioned generation in quark-serve's own format.

Streaming (``stream: true``) sends server-sent events: ``{"type": "delta", "index",
"text"}`` per piece of text, then ``{"type": "done", "response": <the non-streaming
body>}`` (or ``{"type": "error", "error": {...}}``), then ``[DONE]``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from app.auth import require_api_key
from app.deps import ServiceDep
from app.errors import APIError, error_responses
from app.schemas import (
    GeneratedText,
    GenerateParams,
    GenerateRequest,
    GenerateResponse,
    Usage,
)
from app.service import Completed, Generation, GenerationInput
from app.streaming import sse, sse_response, unless_disconnected

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])

ENDPOINT = "/generate"


def _input(params: GenerateParams) -> GenerationInput:
    return GenerationInput(
        prompt=params.prompt,
        endpoint=ENDPOINT,
        reward=params.reward,
        n=params.n,
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop or [],
        log=params.log,
    )


def _response(gen: Generation, completions: list[Completed]) -> GenerateResponse:
    return GenerateResponse(
        id=gen.id,
        model_version=gen.model_version,
        reward=gen.reward,
        completions=[
            GeneratedText.model_validate({"text": c.text, "finish_reason": c.finish_reason})
            for c in completions
        ],
        usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens),
    )


async def _stream(gen: Generation) -> AsyncIterator[bytes]:
    try:
        async for event in gen.events():
            if event.delta:
                yield sse(
                    {"type": "delta", "id": gen.id, "index": event.index, "text": event.delta}
                )
        done = _response(gen, [gen.done[i] for i in range(gen.inp.n)])
        yield sse({"type": "done", "response": done.model_dump(mode="json")})
    except APIError as exc:
        yield sse({"type": "error", **exc.body()})
    yield sse("[DONE]")


async def _run(request: Request, params: GenerateParams, service: ServiceDep) -> object:
    gen = await service.start(_input(params))
    if params.stream:
        return sse_response(_stream(gen))
    completions = await unless_disconnected(request, gen.result())
    return _response(gen, completions)


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Completions (JSON), or server-sent events when stream=true."},
    **error_responses(400, 401, 413, 500, 503, "4XX"),
}


@router.post("/generate", response_model=GenerateResponse, responses=_RESPONSES)
async def generate_post(
    request: Request, body: GenerateRequest, service: ServiceDep
) -> GenerateResponse | StreamingResponse:
    """Generate completions for a JSON body (types checked strictly)."""
    return await _run(request, body, service)  # type: ignore[return-value]


@router.get("/generate", response_model=GenerateResponse, responses=_RESPONSES)
async def generate_get(
    request: Request, params: Annotated[GenerateParams, Query()], service: ServiceDep
) -> GenerateResponse | StreamingResponse:
    """Generate completions; the query parameters are the POST body's fields."""
    return await _run(request, params, service)  # type: ignore[return-value]
