"""Server-sent events and client-disconnect handling shared by the routes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


#: Characters json.dumps(ensure_ascii=False) leaves raw that line splitters such as
#: str.splitlines (and httpx's aiter_lines) treat as line breaks: escaped, so a completion
#: that contains one never splits its event. (CR and LF are always escaped by JSON.)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload.translate(_LINE_BREAKS)}\n\n".encode()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    # Starlette cancels ``events`` when the client disconnects; its ``finally`` cancels
    # the generation, so an abandoned stream stops consuming compute.
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (which cancels the
    generation) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            # Nobody awaits the cancelled work: mark its outcome seen, or asyncio logs an
            # ERROR ("exception was never retrieved") for every client that disconnects
            # from a request with several completions (a gather finishes with an exception).
            task.add_done_callback(_outcome_seen)
            task.cancel()


def _outcome_seen(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
