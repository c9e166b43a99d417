"""The versioned model store: atomic publish, checksums, activation, pruning, version 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from quark.models import QuarkModel
from quark.service.store import (
    ACTIVE_FILE,
    METADATA_FILE,
    CorruptVersion,
    MemoryPointer,
    ModelStore,
    UnknownVersion,
    ensure_initial_version,
)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", MemoryPointer())


def _weights(store: ModelStore, version: str) -> Path:
    return next(store.path(version).glob("*.safetensors"))


def test_publish_writes_a_complete_version_with_checksums(
    store: ModelStore, tiny_qm: QuarkModel
) -> None:
    version = store.publish(tiny_qm, {"parent": None, "eval": {"reward": 0.1}})
    assert version == "v0000"
    meta = store.metadata(version)
    assert meta["version"] == "v0000" and meta["parent"] is None
    assert meta["eval"] == {"reward": 0.1}
    assert len(meta["checksum"]) == 64
    assert "model.safetensors" in meta["files"] and "quark.json" in meta["files"]
    assert store.verify(version)["checksum"] == meta["checksum"]
    # Nothing but versions in the store: the staging directory is gone.
    assert sorted(p.name for p in store.root.iterdir()) == ["v0000"]


def test_versions_are_numbered_in_order_and_loadable(
    store: ModelStore, tiny_qm: QuarkModel
) -> None:
    first = store.publish(tiny_qm, {"parent": None})
    with torch.no_grad():
        tiny_qm.model.get_input_embeddings().weight[5] += 1.0
    second = store.publish(tiny_qm, {"parent": first})
    assert store.versions() == ["v0000", "v0001"]
    loaded = store.load(second, device="cpu")
    assert torch.equal(
        loaded.model.get_input_embeddings().weight, tiny_qm.model.get_input_embeddings().weight
    )
    assert loaded.reward_tokens == tiny_qm.reward_tokens


def test_a_taken_version_number_is_skipped_not_overwritten(
    store: ModelStore, tiny_qm: QuarkModel
) -> None:
    store.publish(tiny_qm, {"parent": None})
    # A concurrent publisher renamed v0001 into place between our scan and our rename.
    squatter = store.root / "v0001"
    squatter.mkdir()
    (squatter / "marker").write_text("theirs")
    original_versions = store.versions
    store.versions = lambda: ["v0000"]  # type: ignore[method-assign]
    try:
        version = store.publish(tiny_qm, {"parent": "v0000"})
    finally:
        store.versions = original_versions  # type: ignore[method-assign]
    assert version == "v0002"
    assert (squatter / "marker").read_text() == "theirs"


def test_corrupt_weights_are_refused(store: ModelStore, tiny_qm: QuarkModel) -> None:
    version = store.publish(tiny_qm, {"parent": None})
    weights = _weights(store, version)
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersion, match=r"model\.safetensors"):
        store.verify(version)
    with pytest.raises(CorruptVersion):
        store.load(version, device="cpu")
    with pytest.raises(CorruptVersion):
        store.activate(version)
    assert store.active() is None


def test_missing_file_and_bad_metadata_are_refused(store: ModelStore, tiny_qm: QuarkModel) -> None:
    version = store.publish(tiny_qm, {"parent": None})
    (store.path(version) / "tokenizer.json").unlink()
    with pytest.raises(CorruptVersion, match=r"tokenizer\.json"):
        store.verify(version)
    (store.path(version) / METADATA_FILE).write_text("{not json")
    with pytest.raises(CorruptVersion):
        store.verify(version)


def test_unknown_and_malicious_names(store: ModelStore) -> None:
    with pytest.raises(UnknownVersion):
        store.verify("v0042")
    with pytest.raises(UnknownVersion):
        store.path("../etc")
    assert not store.exists("../../x")


def test_half_written_directories_are_not_versions(store: ModelStore, tiny_qm: QuarkModel) -> None:
    store.publish(tiny_qm, {"parent": None})
    (store.root / ".staging-deadbeef").mkdir()
    (store.root / "v0007").mkdir()  # no metadata.json: a crash before the final rename
    assert store.versions() == ["v0000"]


def test_activate_records_the_pointer_and_a_local_mirror(
    store: ModelStore, tiny_qm: QuarkModel
) -> None:
    version = store.publish(tiny_qm, {"parent": None})
    store.activate(version)
    assert store.active() == version
    assert (store.root / ACTIVE_FILE).read_text() == version
    assert isinstance(store.pointer, MemoryPointer) and store.pointer.history == [version]


def test_prune_keeps_newest_active_parent_and_root(store: ModelStore, tiny_qm: QuarkModel) -> None:
    parent = None
    for _ in range(7):
        parent = store.publish(tiny_qm, {"parent": parent})
    store.activate("v0003")  # a rollback: active v0003, its parent v0002
    removed = store.prune(retention=2)
    assert store.versions() == ["v0000", "v0002", "v0003", "v0005", "v0006"]
    assert removed == ["v0001", "v0004"]
    assert not any(p.name.startswith(".trash-") for p in store.root.iterdir())
    with pytest.raises(ValueError):
        store.prune(0)


def test_stale_staging_leftovers_are_cleaned(store: ModelStore) -> None:
    store.root.mkdir(parents=True)
    stale = store.root / ".staging-old"
    stale.mkdir()
    os.utime(stale, (0, 0))
    fresh = store.root / ".staging-new"
    fresh.mkdir()
    store.clean_staging(older_than_s=60)
    assert not stale.exists() and fresh.exists()


def test_initial_version_is_created_once(store: ModelStore, tiny_model_dir: Path) -> None:
    version = ensure_initial_version(store, str(tiny_model_dir), 5)
    assert version == "v0000" and store.active() == "v0000"
    meta = store.metadata(version)
    assert meta["parent"] is None and meta["kind"] == "base"
    assert ensure_initial_version(store, str(tiny_model_dir), 5) == "v0000"
    assert store.versions() == ["v0000"]
    quark_json = json.loads((store.path(version) / "quark.json").read_text())
    assert len(quark_json["reward_tokens"]) == 5


def test_lost_pointer_is_restored_from_the_local_mirror(
    store: ModelStore, tiny_qm: QuarkModel, tiny_model_dir: Path
) -> None:
    store.publish(tiny_qm, {"parent": None})
    store.publish(tiny_qm, {"parent": "v0000"})
    store.publish(tiny_qm, {"parent": "v0001"})
    store.activate("v0001")
    store.pointer = MemoryPointer()  # Redis restarted without persistence
    assert ensure_initial_version(store, str(tiny_model_dir), 5) == "v0001"
    assert store.active() == "v0001"
    assert store.versions() == ["v0000", "v0001", "v0002"]
