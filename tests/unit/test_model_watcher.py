"""The server's model watcher: swaps to the active version, refuses corrupt ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import torch

from app.metrics import Metrics
from app.model_watcher import ModelWatcher
from quark.models import QuarkModel
from quark.service.settings import ServiceSettings
from quark.service.store import MemoryPointer, ModelStore


@dataclass
class Served:
    version: str


@dataclass
class FakeEngine:
    model: Served | None = None
    load_error: str | None = None
    swaps: list[tuple[QuarkModel, str]] = field(default_factory=list)

    def swap_model(self, qm: QuarkModel, version: str) -> None:
        self.swaps.append((qm, version))
        self.model = Served(version)


def _watcher(
    tmp_path: Path, dtype: str = "float32"
) -> tuple[ModelWatcher, FakeEngine, ModelStore, Metrics]:
    settings = ServiceSettings(data_dir=tmp_path, device="cpu", admin_token="x", dtype=dtype)
    engine, metrics = FakeEngine(Served("base")), Metrics()
    # A client that is never connected: check() only touches the store and its pointer.
    watcher = ModelWatcher(settings, engine, metrics, client=redis.Redis(port=1))
    watcher.store = ModelStore(settings.store_dir, MemoryPointer())
    return watcher, engine, watcher.store, metrics


def _sample(metrics: Metrics, outcome: str) -> Any:
    return metrics.registry.get_sample_value("quark_model_swaps_total", {"outcome": outcome})


def test_swaps_to_the_active_version_once(tmp_path: Path, tiny_qm: QuarkModel) -> None:
    watcher, engine, store, metrics = _watcher(tmp_path)
    store.activate(store.publish(tiny_qm, {"parent": None}))
    assert watcher.check() == "v0000"
    assert [v for _, v in engine.swaps] == ["v0000"]
    loaded = engine.swaps[0][0]
    assert torch.equal(
        loaded.model.get_input_embeddings().weight, tiny_qm.model.get_input_embeddings().weight
    )
    assert watcher.check() is None  # already serving it
    assert _sample(metrics, "ok") == 1.0


def test_versions_load_in_the_serving_dtype(tmp_path: Path, tiny_qm: QuarkModel) -> None:
    watcher, engine, store, _ = _watcher(tmp_path, dtype="bfloat16")
    store.activate(store.publish(tiny_qm, {"parent": None}))
    assert watcher.check() == "v0000"
    loaded = engine.swaps[0][0]
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    expected = tiny_qm.model.get_input_embeddings().weight.to(torch.bfloat16)
    assert torch.equal(loaded.model.get_input_embeddings().weight, expected)
    # The store itself keeps float32 weights: training loads them as they were trained.
    stored = store.load("v0000", device="cpu")
    assert {p.dtype for p in stored.model.parameters()} == {torch.float32}


def test_a_corrupt_version_is_refused_and_not_retried(tmp_path: Path, tiny_qm: QuarkModel) -> None:
    watcher, engine, store, metrics = _watcher(tmp_path)
    store.activate(store.publish(tiny_qm, {"parent": None}))
    watcher.check()
    bad = store.publish(tiny_qm, {"parent": "v0000"})
    weights = store.path(bad) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7] + b"garbage")
    store.pointer.set(bad)  # announced without verification (e.g. corrupted after publish)
    assert watcher.check() is None
    assert watcher.check() is None
    assert engine.model == Served("v0000") and len(engine.swaps) == 1
    assert watcher.rejected == {bad}
    assert _sample(metrics, "rejected") == 1.0


def test_nothing_to_do_without_an_active_version(tmp_path: Path) -> None:
    watcher, engine, _, _ = _watcher(tmp_path)
    assert watcher.check() is None and engine.swaps == []
