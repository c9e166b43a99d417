"""The generation engine: one thread runs continuous batching over app.decoding.

Requests (``RequestSpec``: prompt ids + one ``RowSampling`` per completion) wait in a bounded
queue; the engine thread admits them between decode steps into one ``DecodeBatch``
(all n rows of a request together), runs one model forward per step for every active row,
and publishes text deltas to each request's asyncio queue on its event loop. Cancelled requests
(client gone) leave the batch at the next step. The model runs only on this thread,
under ``torch.inference_mode``, so the event loop never waits on it.

``swap_model`` stages a new model: the running batch finishes on the version it started
with; no new rows join it, and once it drains, new batches use the new version.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from app.decoding import DecodeBatch, Row, RowSampling, detokenize, make_batch
from app.metrics import Metrics
from app.serving_model import LoadedModel, engine_threads, load_version, wrap_model
from quark.models import QuarkModel
from quark.service.settings import ServiceSettings

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """Generation could not run (the message is safe to show to clients). ``retryable``:
    a temporary condition (503 + Retry-After) rather than a failure (500)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class QueueFull(EngineError):
    """More rows wait than QUARK_MAX_QUEUE allows."""


@dataclass
class RequestSpec:
    """One request: prompt ids (built for ``model``), one sampling per completion."""

    prompt_ids: list[int]
    model: LoadedModel
    samplings: list[RowSampling]
    stop: tuple[str, ...] = ()
    # Rebuilds the prompt ids for another model (after a swap: reward tokens may differ).
    rebuild: Callable[[LoadedModel], list[int]] | None = None


@dataclass(frozen=True)
class Event:
    """Progress of one completion: new text, and the finish reason once done."""

    index: int
    delta: str
    tokens: int  # completion tokens so far
    finish_reason: str | None = None


class RequestHandle:
    """The caller's side of a request: events arrive on ``queue`` (lists of Event, or an error)."""

    def __init__(self, spec: RequestSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.loop = loop
        self.queue: asyncio.Queue[list[Event] | EngineError] = asyncio.Queue()
        self.cancelled = False
        self.model: LoadedModel = spec.model  # the model it actually runs on, once admitted
        self.rows: list[Row] = []
        self.emitted = [0] * len(spec.samplings)  # characters already published per row
        self.submitted_at = time.monotonic()

    def cancel(self) -> None:
        """Stop spending compute on this request (its rows leave the batch at the next step)."""
        self.cancelled = True

    def deliver(self, item: list[Event] | EngineError) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self.cancelled = True


class Engine:
    """Continuous-batching generation on a dedicated thread; see the module docstring."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.load_error: str | None = None
        self._cond = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()
        self._waiting_rows = 0
        self._current: LoadedModel | None = None  # what the running batch uses
        self._pending: LoadedModel | None = None  # staged by swap_model
        self._batch: DecodeBatch | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- public API (event loop / other threads) -------------------------------------------
    @property
    def model(self) -> LoadedModel | None:
        """The model new requests will run on (a staged swap counts)."""
        return self._pending or self._current

    @property
    def ready(self) -> bool:
        return self.model is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def load(self, source: str) -> None:
        """Load ``source`` and serve it (blocking; run in a thread). Errors are kept.

        Not while the server follows the model store (QUARK_WATCH_VERSIONS=1): then the
        model watcher decides what is served at start (the active version, or a verified
        ancestor of it), and nothing is served before; ``source`` without the store's reward
        tokens would answer with less than the store promises."""
        if self.settings.watch_versions:
            log.info("following the model store: the model watcher loads the active version")
            return
        try:
            loaded = load_version(source, self.settings)
        except Exception as exc:
            log.exception("could not load model %r", source)
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.swap_model(loaded.qm, loaded.version)
        log.info("model %s loaded (version %s)", source, loaded.version)

    def swap_model(self, qm: QuarkModel, version: str) -> None:
        """Serve ``qm`` as ``version`` from the next batch on; in-flight rows finish first."""
        loaded = wrap_model(qm, version)
        with self._cond:
            self._pending = loaded
            self.load_error = None
            self._cond.notify_all()

    def submit(self, spec: RequestSpec) -> RequestHandle:
        """Queue a request; raises QueueFull / EngineError instead of waiting."""
        if self._stopping:
            raise EngineError("the server is shutting down; retry on another replica")
        handle = RequestHandle(spec, asyncio.get_running_loop())
        rows = len(spec.samplings)
        with self._cond:
            if self._waiting_rows + rows > self.settings.max_queue:
                raise QueueFull(
                    f"the generation queue is full ({self._waiting_rows} completions waiting); "
                    "retry later"
                )
            self._waiting.append(handle)
            self._waiting_rows += rows
            self.metrics.queue_depth.set(self._waiting_rows)
            self._cond.notify_all()
        return handle

    def stats(self) -> dict[str, object]:
        return {
            "queued": self._waiting_rows,
            "active": len(self._batch) if self._batch else 0,
            "model_version": self.model.version if self.model else None,
            "dtype": self.model.dtype if self.model else None,
        }

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(engine_threads(self.settings.torch_threads))
        with torch.inference_mode():
            while (admitted := self._next_work()) is not None:
                try:
                    self._advance(admitted)
                except Exception as exc:  # a bug or OOM must not kill the engine thread
                    log.exception("decode step failed; failing the requests in the batch")
                    self._fail_batch(admitted, EngineError(f"generation failed: {exc}", False))
        self._fail_all(EngineError("the server is shutting down; retry"))

    def _next_work(self) -> list[RequestHandle] | None:
        """Jobs to admit now ([] = just step the batch); None = stop. Blocks while idle."""
        with self._cond:
            while not self._stopping:
                self._purge_cancelled()
                if self._batch is not None and len(self._batch):
                    return [] if self._pending else self._pop_admissible()
                if self._pending is not None:
                    self._apply_swap()
                if not self._waiting or self._current is None:
                    self._cond.wait(0.5)
                    continue
                # Idle batch: give requests arriving together a moment to share the prefill.
                wait = self._waiting[0].submitted_at + self.settings.batch_wait_ms / 1000
                remaining = wait - time.monotonic()
                if remaining > 0 and self._waiting_rows < self.settings.max_batch_size:
                    self._cond.wait(remaining)
                    continue
                return self._pop_admissible()
            return None

    def _apply_swap(self) -> None:
        assert self._pending is not None
        self._current, self._pending = self._pending, None
        self._batch = make_batch(self._current.qm, self._current.context)
        self.metrics.set_model_version(self._current.version)
        log.info("now serving model version %s", self._current.version)

    def _purge_cancelled(self) -> None:
        if any(h.cancelled for h in self._waiting):
            kept = deque(h for h in self._waiting if not h.cancelled)
            self._waiting_rows = sum(len(h.spec.samplings) for h in kept)
            self._waiting = kept
            self.metrics.queue_depth.set(self._waiting_rows)

    def _pop_admissible(self) -> list[RequestHandle]:
        """Oldest waiting requests that fit the batch whole (strict FIFO: big n never starves)."""
        active = len(self._batch) if self._batch else 0
        room = self.settings.max_batch_size - active
        admitted = []
        while self._waiting and len(self._waiting[0].spec.samplings) <= room:
            handle = self._waiting.popleft()
            room -= len(handle.spec.samplings)
            self._waiting_rows -= len(handle.spec.samplings)
            admitted.append(handle)
        self.metrics.queue_depth.set(self._waiting_rows)
        return admitted

    def _advance(self, admitted: list[RequestHandle]) -> None:
        """Prefill admitted requests, drop cancelled rows, decode one step, publish text."""
        assert self._batch is not None and self._current is not None
        batch = self._batch
        rows = [row for handle in admitted for row in self._make_rows(handle)]
        if rows:
            self._publish(batch.add(rows))
        batch.drop([r for r in batch.rows if r.owner.cancelled])
        if len(batch):
            self.metrics.batch_size.observe(len(batch))
            self._publish(batch.step())
        self.metrics.active_rows.set(len(batch))

    def _make_rows(self, handle: RequestHandle) -> list[Row]:
        model = self._current
        assert model is not None
        ids = handle.spec.prompt_ids
        try:
            if handle.spec.model is not model and handle.spec.rebuild is not None:
                ids = handle.spec.rebuild(model)
            if len(ids) >= model.context:
                raise EngineError(f"prompt of {len(ids)} tokens does not fit the model context")
        except Exception as exc:  # this request only: the others in the batch go on
            handle.deliver(EngineError(f"cannot run on version {model.version}: {exc}", False))
            return []
        handle.model = model
        handle.rows = [
            Row(list(ids), sampling, owner=handle, index=i)
            for i, sampling in enumerate(handle.spec.samplings)
        ]
        return handle.rows

    def _publish(self, rows: list[Row]) -> None:
        """Detokenize each row, apply stop strings, and send every request its events."""
        assert self._batch is not None and self._current is not None
        tokenizer = self._current.qm.tokenizer
        by_request: dict[RequestHandle, list[Event]] = {}
        stopped: list[Row] = []
        for row in rows:
            handle: RequestHandle = row.owner
            if handle.cancelled:
                continue
            text = detokenize(tokenizer, row.tokens)
            text, hit = _apply_stop(text, handle.spec.stop)
            if hit and not row.finished:
                row.finish_reason = "stop"
                stopped.append(row)
            end = len(text) if row.finished else _stream_end(text, handle.spec.stop)
            start = handle.emitted[row.index]
            handle.emitted[row.index] = max(start, end)
            event = Event(row.index, text[start:end], len(row.tokens), row.finish_reason)
            by_request.setdefault(handle, []).append(event)
        self._batch.drop(stopped)
        self.metrics.generated_tokens.inc(len(rows))
        for handle, events in by_request.items():
            handle.deliver(events)

    def _fail_batch(self, admitted: list[RequestHandle], error: EngineError) -> None:
        owners = {r.owner for r in self._batch.rows} if self._batch else set()
        for handle in owners | set(admitted):
            handle.deliver(error)
        if self._current is not None:
            self._batch = make_batch(self._current.qm, self._current.context)

    def _fail_all(self, error: EngineError) -> None:
        with self._cond:
            waiting, self._waiting, self._waiting_rows = list(self._waiting), deque(), 0
        self._fail_batch(waiting, error)


def _apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; returns (text, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _stream_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of an unfinished row's text is safe to stream: hold back an incomplete
    UTF-8 character and anything that could still become the start of a stop string."""
    end = len(text.rstrip("\ufffd"))
    if stops:
        end = min(end, len(text) - max(len(s) for s in stops) + 1)
    return max(0, end)
