"""Follows the active model version and hot-swaps it into the engine, off the request path.

A thread subscribes to ``{prefix}:versions`` (the workers and ``/admin`` publish every
activation there) and, as a fallback for a missed message or a Redis restart, re-reads
``{prefix}:active_version`` every ``QUARK_WATCHER_POLL_S``. When the active version differs
from the one being served, it verifies the version's checksums and loads it on this
thread, then hands it to ``Engine.swap_model``: running rows finish on their version, new
batches start on the new one. A version that fails to verify or load is rejected (logged,
counted in ``quark_model_swaps{outcome="rejected"}``) and the current one keeps serving;
it is tried again only when it is announced again.

At start, the watcher also makes sure version 0 exists (the base model plus reward tokens,
published once under a Redis lock by whichever server or worker comes first).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import redis
from prometheus_client import Counter, Gauge

from app.metrics import Metrics
from quark.models import QuarkModel
from quark.settings import ServiceSettings
from quark.store import ModelStore, RedisVersionPointer, StoreError, ensure_initial_version

log = logging.getLogger(__name__)

BOOTSTRAP_LOCK_S = 900.0


class SwapTarget(Protocol):
    """What the watcher needs from the engine."""

    @property
    def model(self) -> Any: ...  # has .version, or None while nothing is loaded

    @property
    def load_error(self) -> str | None: ...

    def swap_model(self, qm: QuarkModel, version: str) -> None: ...


class ModelWatcher:
    """See the module docstring. ``start()``/``stop()`` from the app's lifespan."""

    def __init__(
        self,
        settings: ServiceSettings,
        engine: SwapTarget,
        metrics: Metrics,
        client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=10, socket_connect_timeout=5
        )
        self.pointer = RedisVersionPointer(self.client, settings.key_prefix)
        self.store = ModelStore(settings.store_dir, self.pointer)
        self.rejected: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._swaps = Counter(
            "quark_model_swaps",
            "Model versions announced to this server, by outcome (ok, rejected)",
            ["outcome"],
            registry=metrics.registry,
        )
        self._load_seconds = Gauge(
            "quark_model_swap_load_seconds",
            "Time to verify and load the last version swapped in",
            registry=metrics.registry,
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def serving(self) -> str | None:
        model = self.engine.model
        return str(model.version) if model is not None else None

    # -- thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        self._wait_for_initial_load()
        while not self._stop.is_set():
            try:
                self._bootstrap()
                self._follow()
            except (redis.RedisError, OSError) as exc:
                log.warning("model watcher lost Redis (%s); retrying", exc)
                self._stop.wait(min(5.0, self.settings.watcher_poll_s))
            except Exception:  # never let the watcher die: serving goes on regardless
                log.exception("model watcher error; retrying")
                self._stop.wait(self.settings.watcher_poll_s)

    def _wait_for_initial_load(self, timeout_s: float = 600.0) -> None:
        """Let the engine's own start-up load finish first, so it cannot undo a swap."""
        deadline = time.monotonic() + timeout_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.engine.model is not None or self.engine.load_error is not None:
                return
            self._stop.wait(0.1)

    def _bootstrap(self) -> None:
        lock = self.pointer.lock("bootstrap", timeout_s=BOOTSTRAP_LOCK_S)
        ensure_initial_version(self.store, self.settings.model, self.settings.num_quantiles, lock)

    def _follow(self) -> None:
        """Check now, then on every announcement or poll interval, until stopped."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.pointer.channel)
            self.check(force=False)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=self.settings.watcher_poll_s)
                announced = _text(message["data"]) if message else None
                if announced is not None:
                    # An explicit announcement retries a version rejected earlier.
                    self.rejected.discard(announced)
                self.check(force=False)
        finally:
            pubsub.close()

    # -- one check -------------------------------------------------------------------------
    def check(self, force: bool = False) -> str | None:
        """Swap to the active version if it is not served yet; returns what was swapped in."""
        target = self.store.active()
        if target is None or (target == self.serving and not force):
            return None
        if target in self.rejected:
            return None
        return self.swap_to(target)

    def swap_to(self, version: str) -> str | None:
        """Verify + load ``version`` (here, not on the engine thread), then stage it."""
        started = time.perf_counter()
        try:
            qm = self.store.load(version, device=self.settings.device)
        except (StoreError, OSError, ValueError, RuntimeError) as exc:
            self.rejected.add(version)
            self._swaps.labels(outcome="rejected").inc()
            log.error(
                "refusing model version %s (%s); still serving %s", version, exc, self.serving
            )
            return None
        self.engine.swap_model(qm, version)
        self._load_seconds.set(time.perf_counter() - started)
        self._swaps.labels(outcome="ok").inc()
        log.info(
            "model version %s loaded in %.2fs; swapping", version, time.perf_counter() - started
        )
        return version


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _NoWatcher:
    def stop(self) -> None:
        return None


def start_watcher(app: Any) -> ModelWatcher | _NoWatcher:
    """Start a watcher for the app's engine (call from the lifespan, after engine.start());
    with QUARK_WATCH_VERSIONS=0 the server keeps serving QUARK_MODEL and never swaps."""
    if not app.state.settings.watch_versions:
        return _NoWatcher()
    watcher = ModelWatcher(app.state.settings, app.state.engine, app.state.metrics)
    watcher.start()
    app.state.model_watcher = watcher
    return watcher
