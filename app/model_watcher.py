"""Follows the active model version and hot-swaps it into the engine, off the request path.

A thread subscribes to ``{prefix}:versions`` (the workers and ``/admin`` publish every
activation there) and, as a fallback for a missed message or a Redis restart, re-reads
``{prefix}:active_version`` every ``QUARK_WATCHER_POLL_S``. When the active version differs
from the one being served, it verifies the version's checksums and loads it on this
thread, then hands it to ``Engine.swap_model``: running rows finish on their version, new
batches start on the new one. A version that fails to verify or load is rejected (logged,
counted in ``quark_model_swaps{outcome="rejected"}``) and the current one keeps serving;
it is tried again only when it is announced again.

What the server serves at start is decided here (the engine loads nothing itself while the
server follows the store, so it never serves ``QUARK_MODEL`` without the store's reward
tokens): the watcher makes sure version 0 exists (the base model plus reward tokens,
published once under a Redis lock by whichever server or worker comes first), then loads the
active version. If that one is refused while nothing is served yet, it serves the newest
version of the active version's ancestry (its ``parent`` chain, then v0000) that verifies.
Whenever the served version is not the active one because the active one was refused,
``degraded`` says why (in /readyz and ``GET /admin/models``), the ``quark_model_fallback``
gauge is 1 and the log says which version serves instead. If no version of the ancestry
verifies, nothing is served and /readyz stays not ready. While Redis cannot be reached at
start, the last activation recorded on disk (``models/ACTIVE``) is served.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import redis
from prometheus_client import Counter, Gauge

from app.metrics import Metrics
from app.serving_model import prepare_for_serving, serving_dtype
from quark.models import QuarkModel
from quark.service.redis_client import connect
from quark.service.settings import ServiceSettings
from quark.service.store import ModelStore, RedisVersionPointer, StoreError, ensure_initial_version

log = logging.getLogger(__name__)

BOOTSTRAP_LOCK_S = 900.0


class SwapTarget(Protocol):
    """What the watcher needs from the engine."""

    load_error: str | None  # why nothing can be served, shown to clients

    @property
    def model(self) -> Any: ...  # has .version, or None while nothing is loaded

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
        self.client = client or connect(settings.redis_url)
        self.pointer = RedisVersionPointer(self.client, settings.key_prefix)
        self.store = ModelStore(settings.store_dir, self.pointer)
        self.rejected: set[str] = set()
        self.active: str | None = None  # the store's active version, as last read
        self.degraded: str | None = None  # why the active version is not served, if it is not
        self._fallback = metrics.model_fallback
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

    def status(self) -> dict[str, Any]:
        """For /readyz: the version served, the active one, and why they differ (or None)."""
        return {"serving": self.serving, "active": self.active, "degraded": self.degraded}

    # -- thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._bootstrap()
                self._follow()
            except (redis.RedisError, OSError) as exc:
                log.warning("model watcher lost Redis (%s); retrying", exc)
                self._serve_local_record()
                self._stop.wait(min(5.0, self.settings.watcher_poll_s))
            except Exception:  # never let the watcher die: serving goes on regardless
                log.exception("model watcher error; retrying")
                self._stop.wait(self.settings.watcher_poll_s)

    def _bootstrap(self) -> None:
        lock = self.pointer.lock("bootstrap", timeout_s=BOOTSTRAP_LOCK_S)
        ensure_initial_version(self.store, self.settings.model, self.settings.num_quantiles, lock)

    def _serve_local_record(self) -> None:
        """Nothing served yet and Redis unreachable: serve the last activation recorded on
        this store's disk (``models/ACTIVE``), if any; Redis's pointer decides once back."""
        if self.serving is not None:
            return
        try:
            version = self.store.local_active()
            if version is None or version in self.rejected:
                return
            log.warning("Redis unreachable at start: serving %s from models/ACTIVE", version)
            self.active = version
            self._settle(version)
        except (StoreError, OSError) as exc:
            log.warning("could not serve the version recorded in models/ACTIVE: %s", exc)

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
        """Swap to the active version if it is not served yet; returns what was swapped in
        (the active version, or a verified ancestor of it when nothing was served yet)."""
        target = self.store.active()
        self.active = target
        if target is None:
            return None
        if target == self.serving and not force:
            self._set_degraded(None)
            return None
        if target in self.rejected:
            return None
        return self._settle(target)

    def _settle(self, target: str) -> str | None:
        """Serve ``target``; if it is refused, keep the version served, or when there is
        none yet, serve the newest version of ``target``'s ancestry that verifies."""
        error = self._swap(target)
        if error is None:
            self._set_degraded(None)
            return target
        if self.serving is not None:  # verified when it was swapped in: it keeps serving
            self._set_degraded(error)
            return None
        for version in self.ancestry(target):
            if version not in self.rejected and self._swap(version) is None:
                self._set_degraded(error)
                log.error(
                    "%s; serving %s instead, the newest version of its ancestry that verifies",
                    error,
                    version,
                )
                return version
        self._set_degraded(f"{error}; no version of its ancestry verifies")
        self.engine.load_error = self.degraded
        log.error("%s: nothing to serve", self.degraded)
        return None

    def ancestry(self, version: str) -> list[str]:
        """``version``'s parent, its parent's parent, ... (newest first), then the root
        version (v0000) if the chain does not reach it (an ancestor was pruned)."""
        chain: list[str] = []
        seen = {version}
        current = version
        while True:
            try:
                parent = self.store.metadata(current).get("parent")
            except StoreError:
                break
            if not parent or str(parent) in seen or not self.store.exists(str(parent)):
                break
            current = str(parent)
            chain.append(current)
            seen.add(current)
        stored = self.store.versions()
        if stored and stored[0] not in seen:
            chain.append(stored[0])
        return chain

    def _set_degraded(self, reason: str | None) -> None:
        self.degraded = reason
        self._fallback.set(1 if reason else 0)

    def swap_to(self, version: str) -> str | None:
        """Verify + load ``version`` (here, not on the engine thread), then stage it."""
        return version if self._swap(version) is None else None

    def _swap(self, version: str) -> str | None:
        """Verify + load + stage ``version``; None, or why it was refused."""
        started = time.perf_counter()
        try:
            qm = self.store.load(
                version, device=self.settings.device, dtype=serving_dtype(self.settings)
            )
            prepare_for_serving(qm, self.settings)
        except (StoreError, OSError, ValueError, RuntimeError) as exc:
            self.rejected.add(version)
            self._swaps.labels(outcome="rejected").inc()
            log.error(
                "refusing model version %s (%s); serving %s",
                version,
                exc,
                self.serving or "nothing yet",
            )
            detail = str(exc).removeprefix(f"{version}: ")
            verifying = isinstance(exc, StoreError) and not detail.startswith("does not load")
            return f"{version} {'failed verification' if verifying else 'failed to load'}: {detail}"
        self.engine.swap_model(qm, version)
        self._load_seconds.set(time.perf_counter() - started)
        self._swaps.labels(outcome="ok").inc()
        log.info(
            "model version %s loaded in %.2fs; swapping", version, time.perf_counter() - started
        )
        return None


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
