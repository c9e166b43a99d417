"""Versioned model store: one directory per version, published atomically, one active pointer.

A version is a directory ``store_dir/vNNNN`` holding the weights (safetensors), the tokenizer
with its reward tokens, ``quark.json`` (written by :func:`quark.models.save_model`) and
``metadata.json`` (parent version, objective, config, data window, evaluation, checksums).
A version made by ACFT also holds the auxiliary model it was fine-tuned with, ``aux_head/``
(safetensors + JSON naming the version it was trained for); every file, in subdirectories
too, is covered by the checksums. It appears
under its final name only through one ``rename`` of a fully written and fsynced staging
directory, so a reader never sees half a version, whatever dies when.

Which version is active lives behind a small :class:`VersionPointer` (Redis in the service:
key ``{prefix}:active_version``, announced on channel ``{prefix}:versions``); the store also
mirrors it in a local ``ACTIVE`` file so that losing Redis never loses the choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from quark.fsutil import fsync_path, fsync_tree, sha256_file
from quark.service.keys import RedisKeys

if TYPE_CHECKING:  # torch is imported when a model is loaded or saved, not with the store
    import torch

    from quark.models import QuarkModel

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
#: Subdirectory of an ACFT version holding its auxiliary head (quark.acft.training.HEAD_DIR).
AUX_HEAD_DIR = "aux_head"
ACTIVE_FILE = "ACTIVE"
_VERSION = re.compile(r"^v(\d{4,})$")
_STAGING_PREFIXES = (".staging-", ".trash-")


class StoreError(RuntimeError):
    """Base class of model store errors."""


class UnknownVersion(StoreError):
    """No such version in the store (never published, or pruned)."""


class CorruptVersion(StoreError):
    """A version's files do not match its recorded checksums."""


class VersionPointer(Protocol):
    """Where the active version is recorded and announced (Redis in the service)."""

    def get(self) -> str | None: ...

    def set(self, version: str) -> None: ...


class MemoryPointer:
    """An in-process pointer, for tests and single-process use."""

    def __init__(self) -> None:
        self.value: str | None = None
        self.history: list[str] = []

    def get(self) -> str | None:
        return self.value

    def set(self, version: str) -> None:
        self.value = version
        self.history.append(version)


class RedisVersionPointer:
    """Active version in ``{prefix}:active_version``; every change is published on
    ``{prefix}:versions`` so servers swap at once (they also poll the key as a fallback)."""

    def __init__(self, client: Any, prefix: str) -> None:
        self.client = client
        self.keys = RedisKeys(prefix)
        self.key = self.keys.active_version
        self.channel = self.keys.versions_channel

    def get(self) -> str | None:
        value = self.client.get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def set(self, version: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.key, version)
        pipe.publish(self.channel, version)
        pipe.execute()

    def lock(self, name: str, timeout_s: float = 600.0) -> AbstractContextManager[Any]:
        """A Redis lock ``{prefix}:lock:{name}`` that expires if its holder dies."""
        return self.client.lock(self.keys.lock(name), timeout=timeout_s, blocking_timeout=timeout_s)


def version_number(version: str) -> int:
    match = _VERSION.match(version)
    if not match:
        raise UnknownVersion(f"{version!r} is not a version name (v0000, v0001, ...)")
    return int(match.group(1))


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_files(directory: Path) -> list[Path]:
    """Every file under a version directory, subdirectories included, in a stable order."""
    return sorted(p for p in directory.rglob("*") if p.is_file())


def file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file in a version directory (by path relative to it, ``aux_head/...``
    for a subdirectory's) except the top-level metadata.json."""
    digests = {}
    for path in version_files(directory):
        name = path.relative_to(directory).as_posix()
        if name != METADATA_FILE:
            digests[name] = sha256_file(path)
    return digests


def weights_checksum(digests: dict[str, str]) -> str:
    """One sha256 over the weight files' names and digests (the headline checksum)."""
    h = hashlib.sha256()
    for name in sorted(digests):
        if name.endswith(".safetensors"):
            h.update(f"{name}:{digests[name]}\n".encode())
    return h.hexdigest()


class ModelStore:
    """Model versions under ``root``; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], pointer: VersionPointer | None = None):
        self.root = Path(root)
        self.pointer: VersionPointer = pointer if pointer is not None else MemoryPointer()

    # -- reading -------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        if not self.root.is_dir():
            return []
        names = [
            p.name
            for p in self.root.iterdir()
            if _VERSION.match(p.name) and (p / METADATA_FILE).is_file()
        ]
        return sorted(names, key=version_number)

    def path(self, version: str) -> Path:
        version_number(version)  # refuses names that could escape the store (../)
        return self.root / version

    def exists(self, version: str) -> bool:
        try:
            return (self.path(version) / METADATA_FILE).is_file()
        except UnknownVersion:
            return False

    def metadata(self, version: str) -> dict[str, Any]:
        path = self.path(version) / METADATA_FILE
        if not path.is_file():
            raise UnknownVersion(f"no version {version} in {self.root}")
        try:
            return dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, OSError) as exc:
            raise CorruptVersion(f"{version}: unreadable {METADATA_FILE} ({exc})") from exc

    def verify(self, version: str) -> dict[str, Any]:
        """Recompute every file's sha256; raise CorruptVersion on any difference."""
        meta = self.metadata(version)
        expected = meta.get("files")
        if not isinstance(expected, dict) or not expected:
            raise CorruptVersion(f"{version}: {METADATA_FILE} lists no files")
        actual = file_digests(self.path(version))
        if actual != expected:
            changed = sorted(
                n for n in set(actual) | set(expected) if actual.get(n) != expected.get(n)
            )
            raise CorruptVersion(f"{version}: files differ from their checksums: {changed}")
        if weights_checksum(actual) != meta.get("checksum"):
            raise CorruptVersion(f"{version}: weights checksum mismatch")
        return meta

    def load(
        self, version: str, device: str = "auto", dtype: torch.dtype | None = None
    ) -> QuarkModel:
        """Verify, then load a version (raises UnknownVersion / CorruptVersion); in
        ``dtype`` (None: float32, as stored and trained)."""
        from quark.models import load_model

        meta = self.verify(version)
        try:
            if dtype is None:
                qm = load_model(self.path(version), device=device)
            else:
                qm = load_model(self.path(version), device=device, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CorruptVersion(f"{version}: does not load ({exc})") from exc
        qm.metadata = {**qm.metadata, "version": version, "parent": meta.get("parent")}
        return qm

    def aux_head(self, version: str) -> Path | None:
        """The auxiliary head stored with an ACFT version (None for other versions)."""
        path = self.path(version) / AUX_HEAD_DIR
        return path if path.is_dir() else None

    def active(self) -> str | None:
        return self.pointer.get()

    def local_active(self) -> str | None:
        """The last version activated from this machine (the pointer's on-disk mirror)."""
        path = self.root / ACTIVE_FILE
        if not path.is_file():
            return None
        return path.read_text().strip() or None

    # -- writing -------------------------------------------------------------------------
    def publish(
        self, qm: QuarkModel, metadata: dict[str, Any], extra_dirs: dict[str, Path] | None = None
    ) -> str:
        """Write ``qm`` as the next version, atomically; returns its name (not activated).

        ``extra_dirs`` {name: directory} are copied into the version as subdirectories (an
        ACFT version's ``aux_head``) and covered by its checksums like every other file."""
        from quark.models import save_model

        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        try:
            save_model(qm, staging)
            for name, source in (extra_dirs or {}).items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"bad subdirectory name {name!r}")
                shutil.copytree(source, staging / name)
                fsync_tree(staging / name)
            digests = file_digests(staging)
            base = {**metadata, "files": digests, "checksum": weights_checksum(digests)}
            return self._rename_into_place(staging, base)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _rename_into_place(self, staging: Path, metadata: dict[str, Any]) -> str:
        """Take the next free version number; a concurrent publisher makes us take the next."""
        number = max((version_number(v) for v in self.versions()), default=-1) + 1
        for _ in range(1000):
            version = version_name(number)
            meta = {**metadata, "version": version, "created_at": time.time()}
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
            with (staging / METADATA_FILE).open("rb") as handle:
                os.fsync(handle.fileno())
            fsync_path(staging)
            try:
                # rename(2) onto an existing non-empty directory fails: no overwrite race.
                os.rename(staging, self.root / version)
            except OSError:
                number += 1
                continue
            fsync_path(self.root)
            log.info("published model version %s", version)
            return version
        raise StoreError(f"could not find a free version number in {self.root}")

    def activate(self, version: str) -> dict[str, Any]:
        """Verify ``version`` and make it the active one (announced to every server)."""
        meta = self.verify(version)
        self._write_local_active(version)
        self.pointer.set(version)
        log.info("activated model version %s", version)
        return meta

    def _write_local_active(self, version: str) -> None:
        tmp = self.root / f".{ACTIVE_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(version)
        os.replace(tmp, self.root / ACTIVE_FILE)

    def protected(self) -> set[str]:
        """Never pruned: the active version, its parent and the root (the base model)."""
        keep: set[str] = set()
        versions = self.versions()
        if versions:
            keep.add(versions[0])
        for active in (self.active(), self.local_active()):
            if active and self.exists(active):
                keep.add(active)
                parent = self.metadata(active).get("parent")
                if parent:
                    keep.add(str(parent))
        return keep

    def prune(self, retention: int) -> list[str]:
        """Delete all but the newest ``retention`` versions (and the protected ones)."""
        if retention < 1:
            raise ValueError(f"retention must be >= 1, got {retention}")
        versions = self.versions()
        keep = set(versions[-retention:]) | self.protected()
        removed = []
        for version in versions:
            if version not in keep:
                self._remove(self.root / version)
                removed.append(version)
        self.clean_staging()
        if removed:
            log.info("pruned model versions %s", removed)
        return removed

    def _remove(self, path: Path) -> None:
        # Rename first so the version disappears at once, then delete at leisure.
        trash = self.root / f".trash-{path.name}-{uuid.uuid4().hex}"
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_staging(self, older_than_s: float = 3600.0) -> None:
        """Remove leftovers of publishers that died mid-write (they are never versions)."""
        if not self.root.is_dir():
            return
        cutoff = time.time() - older_than_s
        for path in self.root.iterdir():
            stale = path.name.startswith(_STAGING_PREFIXES) or ".tmp-" in path.name
            if stale and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _no_lock() -> Iterator[None]:
    yield


def ensure_initial_version(
    store: ModelStore,
    base_model: str,
    num_quantiles: int,
    lock: AbstractContextManager[Any] | None = None,
) -> str:
    """The active version, creating version 0 (base model + K reward tokens) when none exists.

    Idempotent and safe to race: servers and workers all call it at start, under ``lock``.
    """
    current = _usable_active(store)
    if current:
        return current
    with lock if lock is not None else _no_lock():
        current = _usable_active(store)
        if current:
            return current
        versions = store.versions()
        fallback = store.local_active() or (versions[-1] if versions else None)
        if fallback and store.exists(fallback):
            # Redis lost the pointer (restart without persistence): restore, do not reset.
            log.warning("no active version recorded; re-activating %s", fallback)
            store.activate(fallback)
            return fallback
        return _publish_base(store, base_model, num_quantiles)


def _usable_active(store: ModelStore) -> str | None:
    active = store.active()
    return active if active and store.exists(active) else None


def _publish_base(store: ModelStore, base_model: str, num_quantiles: int) -> str:
    import torch

    from quark.models import add_reward_tokens, load_model

    qm = load_model(base_model, device="cpu")
    # A fixed generator: every machine bootstrapping from the same base gets the same v0.
    add_reward_tokens(qm, num_quantiles, torch.Generator().manual_seed(0))
    qm.metadata.setdefault("base_model", base_model)
    version = store.publish(
        qm, {"parent": None, "kind": "base", "base_model": base_model, "eval": None}
    )
    store.activate(version)
    return version
