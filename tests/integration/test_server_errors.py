"""An unexpected error answers one 500 (the error object, type ``server_error``) and leaves
the keep-alive connection usable: the next request on it succeeds.

A real uvicorn server runs the app (tiny model) on a thread of this process, so a test can
add a route that fails and patch the generation service; one ``httpx.Client`` holds one
connection, and its local port shows that the second request went over the same one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from app.main import create_app
from quark.service.settings import ServiceSettings
from quark.service.up import free_port
from tests.conftest import REDIS_URL

from .conftest import ADMIN_TOKEN


@dataclass
class LiveApp:
    app: FastAPI
    url: str


class Boom(RuntimeError):
    """An error no handler knows."""


@pytest.fixture(scope="module")
def live(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, key_prefix: str
) -> Iterator[LiveApp]:
    settings = ServiceSettings(
        model=str(tiny_model_dir),
        redis_url=REDIS_URL,
        key_prefix=f"{key_prefix}-errors",
        data_dir=tmp_path_factory.mktemp("server-errors") / "data",
        admin_token=ADMIN_TOKEN,
        watch_versions=False,
        torch_threads=1,
        default_max_new_tokens=2,
    )
    app = create_app(settings)

    @app.get("/test-only/boom")
    async def boom() -> None:
        raise Boom("a bug")

    port = free_port()
    # log_config=None: uvicorn's loggers propagate to pytest's caplog.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if server.started and httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.2)
    yield LiveApp(app, url)
    server.should_exit = True
    thread.join(30)


def _local_port(response: httpx.Response) -> int:
    """The client side port of the connection the response came over."""
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


def _assert_server_error(response: httpx.Response) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}


def _generate_fails_once(live: LiveApp, monkeypatch: pytest.MonkeyPatch) -> None:
    service = live.app.state.service
    real_start = service.start
    calls = {"n": 0}

    async def start(inp: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Boom("the generation service failed")
        return await real_start(inp)

    monkeypatch.setattr(service, "start", start)


@pytest.mark.parametrize("failing", ["test-only route", "generation service"])
def test_a_500_leaves_the_connection_usable(
    live: LiveApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    if failing == "generation service":
        _generate_fails_once(live, monkeypatch)
        request: dict[str, Any] = {
            "method": "POST",
            "url": "/v1/completions",
            "json": {"prompt": "Hello", "max_tokens": 2, "seed": 1},
        }
    else:
        request = {"method": "GET", "url": "/test-only/boom"}
    caplog.set_level(logging.ERROR)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        first = client.request(**request)
        _assert_server_error(first)
        # A normal generation (the service works again) over the same connection.
        after = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 2})
        assert after.status_code == 200, after.text
        assert _local_port(after) == _local_port(first), "the connection was dropped"
    unhandled = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert len(unhandled) == 1 and unhandled[0].exc_info is not None  # logged once, with trace
    # Nothing reached uvicorn (it logs this, then closes the connection).
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_an_error_after_the_response_started_is_not_answered_twice(live: LiveApp) -> None:
    """A stream that fails midway cannot become a 500: the connection is closed, and the
    client sees a truncated body, never a second response."""

    @live.app.get("/test-only/broken-stream")
    async def broken() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: first\n\n"
            raise Boom("midway")

        return StreamingResponse(body(), media_type="text/event-stream")

    with httpx.Client(base_url=live.url, timeout=30) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/test-only/broken-stream").read()
        assert client.get("/healthz").status_code == 200  # a new connection is made
