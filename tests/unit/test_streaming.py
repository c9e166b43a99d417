"""app.streaming.unless_disconnected: a disconnect cancels the work quietly."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from typing import Any

import pytest

from app.streaming import ClientDisconnected, sse, unless_disconnected


class _Disconnecting:
    """A Request whose client disconnects at once."""

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.disconnect"}


def test_a_disconnect_cancels_a_gather_without_an_unretrieved_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two completions of one request (asyncio.gather) are cancelled when the client goes,
    and asyncio has no 'exception was never retrieved' to log about it."""
    started: list[asyncio.Task[Any]] = []

    async def completion() -> str:
        started.append(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(60)
        return "text"

    async def request() -> None:
        work = asyncio.gather(completion(), completion())
        with pytest.raises(ClientDisconnected):
            await unless_disconnected(_Disconnecting(), work)  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # let the cancellation reach the completions
        assert started and all(t.cancelled() for t in started)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(request())
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_an_event_is_one_line_whatever_the_text_contains() -> None:
    text = "a\u2028b\u2029c\x85d\re\nf \u00e9"
    event = sse({"type": "delta", "text": text}).decode()
    assert event.endswith("\n\n")
    [line] = event[:-2].splitlines()  # one line even for str.splitlines
    assert json.loads(line.removeprefix("data: "))["text"] == text
    assert "\u00e9" in line  # other text stays readable (not ASCII-escaped)
