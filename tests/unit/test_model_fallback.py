"""Never serve less than the store promises (issue 9): what the watcher serves when the active
version fails verification, what the engine serves at start, which versions /admin reports as
verified."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from app.engine import Engine
from app.metrics import Metrics
from app.model_watcher import ModelWatcher
from quark.models import QuarkModel
from quark.service.settings import ServiceSettings
from quark.service.store import MemoryPointer, ModelStore
from quark.service.verification import VerificationCache


@dataclass
class Served:
    version: str


@dataclass
class FakeEngine:
    model: Served | None = None
    load_error: str | None = None
    swaps: list[str] = field(default_factory=list)

    def swap_model(self, qm: QuarkModel, version: str) -> None:
        self.swaps.append(version)
        self.model = Served(version)
        self.load_error = None


def _watcher(tmp_path: Path) -> tuple[ModelWatcher, FakeEngine, ModelStore, Metrics]:
    """A watcher at start: nothing served yet (the engine loads nothing itself)."""
    settings = ServiceSettings(data_dir=tmp_path, device="cpu", admin_token="x")
    engine, metrics = FakeEngine(), Metrics()
    watcher = ModelWatcher(settings, engine, metrics, client=redis.Redis(port=1))
    watcher.store = ModelStore(settings.store_dir, MemoryPointer())
    return watcher, engine, watcher.store, metrics


def _chain(store: ModelStore, qm: QuarkModel, n: int) -> list[str]:
    """v0000 <- v0001 <- ... (each the parent of the next)."""
    versions: list[str] = []
    for _ in range(n):
        versions.append(store.publish(qm, {"parent": versions[-1] if versions else None}))
    return versions


def _corrupt(store: ModelStore, version: str) -> None:
    weights = store.path(version) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))


def _fallback(metrics: Metrics) -> Any:
    return metrics.registry.get_sample_value("quark_model_fallback")


def test_a_corrupt_active_version_falls_back_to_its_parent(
    tmp_path: Path, tiny_qm: QuarkModel
) -> None:
    watcher, engine, store, metrics = _watcher(tmp_path)
    _chain(store, tiny_qm, 3)
    store.activate("v0002")
    _corrupt(store, "v0002")
    assert watcher.check() == "v0001"
    assert engine.swaps == ["v0001"]
    status = watcher.status()
    assert (status["serving"], status["active"]) == ("v0001", "v0002")
    assert status["degraded"].startswith("v0002 failed verification: files differ")
    assert _fallback(metrics) == 1.0
    assert watcher.check() is None and engine.swaps == ["v0001"]  # settled: no retry loop
    # The admin activates a good version: served, no longer degraded.
    good = store.publish(tiny_qm, {"parent": "v0001"})
    store.activate(good)
    assert watcher.check() == good
    assert watcher.status() == {"serving": good, "active": good, "degraded": None}
    assert _fallback(metrics) == 0.0


def test_corrupt_ancestors_are_skipped_and_a_pruned_chain_ends_at_v0000(
    tmp_path: Path, tiny_qm: QuarkModel
) -> None:
    watcher, engine, store, _ = _watcher(tmp_path)
    _chain(store, tiny_qm, 5)
    _corrupt(store, "v0003")
    assert watcher.ancestry("v0004") == ["v0003", "v0002", "v0001", "v0000"]
    store.prune(1)  # keeps v0004 (newest), v0000 (root); v0003 ... v0001 go
    assert store.versions() == ["v0000", "v0004"]
    store.pointer.set("v0004")
    _corrupt(store, "v0004")
    assert watcher.ancestry("v0004") == ["v0000"]
    assert watcher.check() == "v0000" and engine.swaps == ["v0000"]
    watcher2, engine2, store2, _ = _watcher(tmp_path / "other")
    _chain(store2, tiny_qm, 4)
    _corrupt(store2, "v0003")
    _corrupt(store2, "v0002")
    store2.pointer.set("v0003")
    assert watcher2.check() == "v0001" and engine2.swaps == ["v0001"]


def test_nothing_is_served_when_no_version_of_the_ancestry_verifies(
    tmp_path: Path, tiny_qm: QuarkModel
) -> None:
    watcher, engine, store, metrics = _watcher(tmp_path)
    _chain(store, tiny_qm, 2)
    store.activate("v0001")
    _corrupt(store, "v0001")
    _corrupt(store, "v0000")
    assert watcher.check() is None
    assert engine.model is None and engine.swaps == []
    assert engine.load_error is not None and "no version of its ancestry" in engine.load_error
    assert _fallback(metrics) == 1.0


def test_once_a_version_serves_a_refused_one_leaves_it_serving(
    tmp_path: Path, tiny_qm: QuarkModel
) -> None:
    watcher, engine, store, metrics = _watcher(tmp_path)
    _chain(store, tiny_qm, 2)
    store.activate("v0001")
    assert watcher.check() == "v0001"
    bad = store.publish(tiny_qm, {"parent": "v0000"})  # not a descendant of v0001
    _corrupt(store, bad)
    store.pointer.set(bad)
    assert watcher.check() is None
    assert engine.swaps == ["v0001"]  # not swapped back to v0000, its verified parent
    assert watcher.status()["degraded"].startswith(f"{bad} failed verification")
    assert _fallback(metrics) == 1.0


def test_redis_down_at_start_serves_the_activation_recorded_on_disk(
    tmp_path: Path, tiny_qm: QuarkModel
) -> None:
    watcher, engine, store, _ = _watcher(tmp_path)
    _chain(store, tiny_qm, 2)
    store.activate("v0001")  # also written to models/ACTIVE
    watcher._serve_local_record()
    assert engine.swaps == ["v0001"] and watcher.active == "v0001"
    watcher._serve_local_record()  # already serving: nothing to do
    assert engine.swaps == ["v0001"]


def test_the_engine_loads_nothing_itself_while_the_watcher_decides(tmp_path: Path) -> None:
    following = ServiceSettings(data_dir=tmp_path, admin_token="x", watch_versions=True)
    engine = Engine(following, Metrics())
    engine.load(str(tmp_path / "no-such-model"))
    assert engine.model is None and engine.load_error is None  # not even tried
    pinned = ServiceSettings(data_dir=tmp_path, admin_token="x", watch_versions=False)
    engine = Engine(pinned, Metrics())
    engine.load(str(tmp_path / "no-such-model"))
    assert engine.model is None and engine.load_error is not None


def test_verification_is_cached_until_the_files_change(
    tmp_path: Path, tiny_qm: QuarkModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path / "models", MemoryPointer())
    _chain(store, tiny_qm, 2)
    calls: list[str] = []
    verify = store.verify

    def counting(version: str) -> dict[str, Any]:
        calls.append(version)
        return verify(version)

    monkeypatch.setattr(store, "verify", counting)
    cache = VerificationCache()
    assert cache.error(store, "v0000") is None and cache.error(store, "v0001") is None
    assert cache.error(store, "v0000") is None and cache.error(store, "v0001") is None
    assert calls == ["v0000", "v0001"]  # the second round read no weights
    _corrupt(store, "v0001")
    error = cache.error(store, "v0001")
    assert error is not None and "model.safetensors" in error
    assert cache.error(store, "v0001") == error and calls == ["v0000", "v0001", "v0001"]
    assert cache.error(store, "v0042") is not None  # unknown: an error, not an exception
