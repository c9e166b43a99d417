"""Which stored versions verify, cached by their files' stat, for the admin API."""

from __future__ import annotations

from pathlib import Path

from quark.service.store import ModelStore, StoreError, version_files


class VerificationCache:
    """Which versions verify, recomputed only when a version's files change.

    Verifying reads every byte (a sha256 per file: seconds per version for a real model),
    too slow for every ``GET /admin/models``. The cache keys each result by the version's
    file names, sizes, mtimes and inodes (a few ``stat`` calls): rewriting, replacing or
    truncating a file changes the key. A change that keeps size and mtime (``touch -r``
    after editing bytes in place) is not seen until the process restarts or
    ``ModelStore.verify`` is called.
    """

    def __init__(self) -> None:
        self._results: dict[str, tuple[tuple[tuple[str, int, int, int], ...], str | None]] = {}

    def error(self, store: ModelStore, version: str) -> str | None:
        """None if ``version`` verifies, else why not (the message of the failure)."""
        try:
            stamp = _files_stamp(store.path(version))
        except (OSError, StoreError) as exc:
            return f"{version}: unreadable ({exc})"
        cached = self._results.get(version)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        error: str | None = None
        try:
            store.verify(version)
        except StoreError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{version}: unreadable ({exc})"
        self._results[version] = (stamp, error)
        return error

    def forget_all_but(self, versions: list[str]) -> None:
        """Drop the results of versions no longer stored (pruned)."""
        for version in set(self._results) - set(versions):
            self._results.pop(version, None)


def _files_stamp(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    stamp = []
    for path in version_files(directory):
        st = path.stat()
        name = path.relative_to(directory).as_posix()
        stamp.append((name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(stamp)
