"""The parallel scheme's head store: atomic, one head per version, verified, pruned with the
versions (plain files stand in for a head: the store never reads them as tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quark.service.aux_heads import AUX_HEADS_DIR, HEAD_METADATA, AuxHeads
from quark.service.store import (
    METADATA_FILE,
    CorruptVersion,
    MemoryPointer,
    ModelStore,
    UnknownVersion,
)


def _store(tmp_path: Path, versions: int) -> ModelStore:
    store = ModelStore(tmp_path / "models", MemoryPointer())
    for i in range(versions):  # a version is a directory with metadata.json (enough here)
        path = store.root / f"v{i:04d}"
        path.mkdir(parents=True)
        (path / METADATA_FILE).write_text(json.dumps({"version": path.name}))
    return store


def _head(tmp_path: Path, tag: str) -> Path:
    path = tmp_path / f"head-{tag}"
    path.mkdir()
    (path / "head.safetensors").write_bytes(tag.encode() * 10)
    (path / "head.json").write_text(json.dumps({"tag": tag}))
    return path


def test_publish_get_latest(tmp_path: Path) -> None:
    heads = AuxHeads(_store(tmp_path, 3))
    assert heads.latest() is None and heads.get("v0001") is None
    heads.publish("v0000", _head(tmp_path, "a"), {"steps": 2})
    heads.publish("v0001", _head(tmp_path, "b"), {"steps": 3})
    assert heads.versions() == ["v0000", "v0001"]
    version, path = heads.latest() or ("", Path())
    assert version == "v0001" and (path / "head.safetensors").read_bytes() == b"b" * 10
    meta = heads.verify("v0001")
    assert meta["steps"] == 3 and meta["version"] == "v0001"
    assert set(meta["files"]) == {"head.safetensors", "head.json"}
    assert not list((tmp_path / "models" / AUX_HEADS_DIR).glob(".staging-*"))


def test_the_first_head_of_a_version_stays(tmp_path: Path) -> None:
    heads = AuxHeads(_store(tmp_path, 1))
    first = heads.publish("v0000", _head(tmp_path, "a"), {"job_id": "one"})
    again = heads.publish("v0000", _head(tmp_path, "b"), {"job_id": "two"})
    assert again == first and heads.metadata("v0000")["job_id"] == "one"
    assert (first / "head.safetensors").read_bytes() == b"a" * 10


def test_a_tampered_head_is_skipped(tmp_path: Path) -> None:
    heads = AuxHeads(_store(tmp_path, 2))
    heads.publish("v0000", _head(tmp_path, "a"), {})
    newest = heads.publish("v0001", _head(tmp_path, "b"), {})
    (newest / "head.safetensors").write_bytes(b"tampered")
    with pytest.raises(CorruptVersion):
        heads.verify("v0001")
    assert heads.latest() == ("v0000", heads.root / "v0000")


def test_heads_of_removed_versions_are_unusable_and_pruned(tmp_path: Path) -> None:
    store = _store(tmp_path, 2)
    heads = AuxHeads(store)
    heads.publish("v0000", _head(tmp_path, "a"), {})
    heads.publish("v0001", _head(tmp_path, "b"), {})
    (store.root / "v0001" / METADATA_FILE).unlink()  # v0001 pruned: q cannot be built
    assert heads.latest() == ("v0000", heads.root / "v0000")
    assert heads.prune() == ["v0001"]
    assert not (heads.root / "v0001").exists() and (heads.root / "v0000" / HEAD_METADATA).is_file()


def test_names_that_escape_the_store_are_refused(tmp_path: Path) -> None:
    heads = AuxHeads(_store(tmp_path, 1))
    with pytest.raises(UnknownVersion):
        heads.publish("../v0000", _head(tmp_path, "a"), {})
