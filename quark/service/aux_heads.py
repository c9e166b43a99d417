"""The auxiliary heads of ACFT's parallel scheme, stored beside the versions they were trained
for (``quark.online.aux_job`` publishes them, ``quark.online.acft_job`` reads the newest).

``store_dir/aux/vNNNN/`` holds the head trained on samples of version ``vNNNN`` (safetensors
+ JSON, ``quark.acft.head``) and ``aux.json``: what trained it and the sha256 of every file.
A head appears under its name only through one ``rename`` of a fully written and fsynced
staging directory. There is one head per version: the first one published stays (a second
publish for the same version returns the first), so a re-delivered aux task changes nothing.
A head is only usable while its version exists: q is built from that version's weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from quark.fsutil import fsync_path, fsync_tree
from quark.service.store import CorruptVersion, ModelStore, file_digests, version_number

log = logging.getLogger(__name__)

AUX_HEADS_DIR = "aux"
HEAD_METADATA = "aux.json"


class AuxHeads:
    """The heads under ``store.root / "aux"``; see the module docstring."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.root = store.root / AUX_HEADS_DIR

    def versions(self) -> list[str]:
        """Versions that have a head and still exist, oldest first."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if (p / HEAD_METADATA).is_file()]
        return sorted((v for v in names if self.store.exists(v)), key=version_number)

    def get(self, version: str) -> Path | None:
        """The head trained for ``version`` (None if there is none)."""
        path = self.root / self.store.path(version).name  # validates the name
        return path if (path / HEAD_METADATA).is_file() else None

    def latest(self) -> tuple[str, Path] | None:
        """(version, head directory) of the newest version with a head that verifies."""
        for version in reversed(self.versions()):
            try:
                self.verify(version)
            except CorruptVersion as exc:
                log.error("skipping the auxiliary head of %s: %s", version, exc)
                continue
            return version, self.root / version
        return None

    def metadata(self, version: str) -> dict[str, Any]:
        path = self.root / self.store.path(version).name / HEAD_METADATA
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptVersion(f"aux head of {version}: unreadable {HEAD_METADATA}") from exc

    def verify(self, version: str) -> dict[str, Any]:
        """Recompute every file's sha256; raise CorruptVersion on any difference."""
        meta = self.metadata(version)
        actual = file_digests(self.root / version)
        actual.pop(HEAD_METADATA, None)
        if actual != meta.get("files"):
            raise CorruptVersion(f"aux head of {version}: files differ from their checksums")
        return meta

    def publish(self, version: str, head_dir: Path, metadata: dict[str, Any]) -> Path:
        """Store ``head_dir`` as the head of ``version``, atomically; the existing head if
        ``version`` already has one."""
        target = self.root / self.store.path(version).name
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        try:
            shutil.copytree(head_dir, staging)
            files = file_digests(staging)
            meta = {**metadata, "version": version, "files": files, "created_at": time.time()}
            (staging / HEAD_METADATA).write_text(json.dumps(meta, indent=2, default=str))
            fsync_tree(staging)
            try:
                os.rename(staging, target)  # fails onto an existing head: the first one stays
            except OSError:
                log.info("version %s already has an auxiliary head; keeping it", version)
                return target
            fsync_path(self.root)
            log.info("published the auxiliary head of %s", version)
            return target
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def prune(self) -> list[str]:
        """Remove the heads of versions that no longer exist (and staging leftovers)."""
        if not self.root.is_dir():
            return []
        removed = []
        for path in self.root.iterdir():
            orphan = (path / HEAD_METADATA).is_file() and not self.store.exists(path.name)
            stale = path.name.startswith(".staging-") and path.stat().st_mtime < time.time() - 3600
            if orphan or stale:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed
