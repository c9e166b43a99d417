"""app.engine in-process: model swap between batches, bounded queue, cancellation, stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.decoding import RowSampling, decode_text
from app.engine import Engine, Event, QueueFull, RequestHandle, RequestSpec
from app.metrics import Metrics
from app.serving_model import wrap_model
from quark.models import QuarkModel
from quark.service.settings import ServiceSettings
from testkit.tiny_model import build_tiny_model


@pytest.fixture
def engine(tiny_qm: QuarkModel, tmp_path: Path) -> Iterator[Engine]:
    settings = ServiceSettings(
        model="unused", data_dir=tmp_path, max_batch_size=4, max_n=4, max_queue=4, batch_wait_ms=0
    )
    engine = Engine(settings, Metrics())
    engine.start()
    engine.swap_model(tiny_qm, "v1")
    yield engine
    engine.stop()


def _spec(engine: Engine, prompt: str, n: int = 1, tokens: int = 8, **kw: object) -> RequestSpec:
    model = engine.model
    assert model is not None
    ids = model.qm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    samplings = [RowSampling(tokens, 1.0, seed=i) for i in range(n)]
    return RequestSpec(list(ids), model, samplings, **kw)  # type: ignore[arg-type]


async def _collect(handle: RequestHandle, n: int = 1) -> list[tuple[str, str]]:
    texts, reasons = [""] * n, [""] * n
    while sum(bool(r) for r in reasons) < n:
        item = await asyncio.wait_for(handle.queue.get(), 30)
        assert isinstance(item, list), item
        for event in item:
            assert isinstance(event, Event)
            texts[event.index] += event.delta
            reasons[event.index] = event.finish_reason or ""
    return list(zip(texts, reasons, strict=True))


def test_engine_output_equals_offline_decode(engine: Engine, tiny_qm: QuarkModel) -> None:
    async def run() -> list[tuple[str, str]]:
        return await _collect(engine.submit(_spec(engine, "Once upon a time", n=2)), 2)

    offline = decode_text(
        tiny_qm, "Once upon a time", None, [RowSampling(8, 1.0, seed=i) for i in (0, 1)]
    )
    assert asyncio.run(run()) == offline


def test_swap_model_between_batches(engine: Engine, tokenizer_cache: Path) -> None:
    other = build_tiny_model(tokenizer_cache, seed=1)

    async def run() -> tuple[str, str]:
        first = engine.submit(_spec(engine, "Hello", tokens=40))
        await first.queue.get()  # admitted and decoding
        engine.swap_model(other, "v2")
        second = engine.submit(_spec(engine, "Hello", tokens=5))
        await _collect(second)
        return first.model.version, second.model.version

    assert asyncio.run(run()) == ("v1", "v2")
    assert engine.model is not None and engine.model.version == "v2"


def test_full_queue_refuses_instead_of_growing(engine: Engine) -> None:
    async def run() -> None:
        running = engine.submit(_spec(engine, "Hello", n=4, tokens=200))
        await running.queue.get()  # the batch (4 rows) is full now
        engine.submit(_spec(engine, "Hello", n=4))  # waits: the queue holds 4 rows
        with pytest.raises(QueueFull):
            engine.submit(_spec(engine, "Hello", n=1))
        running.cancel()

    asyncio.run(run())


def test_cancelled_job_stops_consuming_compute(engine: Engine) -> None:
    async def run() -> None:
        handle = engine.submit(_spec(engine, "Hello", n=2, tokens=400))
        await handle.queue.get()
        handle.cancel()
        deadline = time.monotonic() + 5
        while engine.stats()["active"] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert engine.stats()["active"] == 0
        assert all(len(r.tokens) < 400 for r in handle.rows)

    asyncio.run(run())


def test_stop_string_cuts_the_text(engine: Engine, tiny_qm: QuarkModel) -> None:
    full, _ = decode_text(tiny_qm, "Hello", None, [RowSampling(12, 1.0, seed=0)])[0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full

    async def run() -> list[tuple[str, str]]:
        return await _collect(engine.submit(_spec(engine, "Hello", tokens=12, stop=(stop,))))

    assert asyncio.run(run()) == [(full[: full.index(stop)], "stop")]


def test_prompt_rebuilt_for_a_swapped_model(engine: Engine, tokenizer_cache: Path) -> None:
    """A request built for one version but admitted after a swap gets the new version's ids."""
    other = wrap_model(build_tiny_model(tokenizer_cache, seed=2), "v3")
    rebuilt: list[str] = []

    def rebuild(model: object) -> list[int]:
        rebuilt.append(getattr(model, "version", ""))
        return [1, 2, 3]

    async def run() -> str:
        spec = _spec(engine, "Hello", tokens=3, rebuild=rebuild)
        engine.swap_model(other.qm, other.version)
        handle = engine.submit(spec)
        await _collect(handle)
        return handle.model.version

    assert asyncio.run(run()) == "v3"
    assert rebuilt == ["v3"]
