"""A bounded, ordered, crash-safe on-disk queue of JSON lines: the pool's fallback while
Redis is unreachable.

Records are appended to JSONL segment files (``seg-<seq>.jsonl``, at most
``segment_records`` lines each) and fsynced before ``append`` returns. Replay reads the
oldest segment from ``head.offset`` on, and ``commit`` advances that offset (fsynced too)
and deletes a segment once every line of it has reached Redis. A crash between a Redis
write and its commit replays that chunk again (at-least-once); within one process
nothing is written twice. Not thread-safe: one writer thread owns it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from quark.fsutil import fsync_path

log = logging.getLogger(__name__)

_PREFIX, _SUFFIX = "seg-", ".jsonl"
OFFSET_FILE = "head.offset"


def _repair(path: Path) -> int:
    """Drop a torn last line (a crash mid-append) and return the number of whole lines."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("spool %s: dropping a torn last line of %d bytes", path, len(data) - keep)
        with path.open("r+b") as handle:
            handle.truncate(keep)
            os.fsync(handle.fileno())
        data = data[:keep]
    return data.count(b"\n")


class Spool:
    """Ordered JSON lines on disk, bounded by ``max_records``; see the module docstring."""

    def __init__(self, directory: Path, max_records: int, segment_records: int = 1000) -> None:
        if max_records < 1 or segment_records < 1:
            raise ValueError("max_records and segment_records must be >= 1")
        self.directory = Path(directory)
        self.max_records = max_records
        self.segment_records = segment_records
        self.directory.mkdir(parents=True, exist_ok=True)
        # [path, lines] oldest first; the last one is where appends go.
        self._segments: list[list] = []
        self._offset = 0  # lines of the head segment already committed
        self._load()

    def __len__(self) -> int:
        return sum(count for _, count in self._segments) - self._offset

    @property
    def segments(self) -> int:
        return len(self._segments)

    def writable(self) -> bool:
        return os.access(self.directory, os.W_OK) and len(self) < self.max_records

    def _load(self) -> None:
        paths = sorted(self.directory.glob(f"{_PREFIX}*{_SUFFIX}"))
        self._segments = [[p, _repair(p)] for p in paths]
        offset_file = self.directory / OFFSET_FILE
        if self._segments and offset_file.exists():
            name, _, value = offset_file.read_text().strip().partition(" ")
            if name == self._segments[0][0].name and value.isdigit():
                self._offset = min(int(value), self._segments[0][1])
        if len(self):
            log.info("spool %s holds %d records to replay", self.directory, len(self))

    def append(self, lines: Sequence[str]) -> int:
        """Append lines (each one JSON document without newlines); returns how many were
        accepted: the rest would exceed ``max_records`` and are the caller's to count."""
        room = max(0, self.max_records - len(self))
        accepted = list(lines[:room])
        start = 0
        while start < len(accepted):
            if not self._segments or self._segments[-1][1] >= self.segment_records:
                self._new_segment()
            segment = self._segments[-1]
            take = accepted[start : start + self.segment_records - segment[1]]
            with segment[0].open("a", encoding="utf-8") as handle:
                handle.write("".join(line + "\n" for line in take))
                handle.flush()
                os.fsync(handle.fileno())
            segment[1] += len(take)
            start += len(take)
        return len(accepted)

    def _new_segment(self) -> None:
        last = (
            int(self._segments[-1][0].name[len(_PREFIX) : -len(_SUFFIX)]) if self._segments else 0
        )
        path = self.directory / f"{_PREFIX}{last + 1:012d}{_SUFFIX}"
        path.touch()
        fsync_path(self.directory)
        self._segments.append([path, 0])

    def peek(self, limit: int) -> list[str]:
        """Up to ``limit`` of the oldest uncommitted lines (from one segment)."""
        if not len(self):
            return []
        path, count = self._segments[0]
        with path.open(encoding="utf-8") as handle:
            # Split on "\n" alone: str.splitlines also breaks at U+2028, U+0085 and other
            # characters a JSON line written with ensure_ascii=False may hold raw.
            lines = handle.read().split("\n")[:count]
        return lines[self._offset : self._offset + limit]

    def commit(self, count: int) -> None:
        """Mark the first ``count`` peeked lines as delivered."""
        if count <= 0:
            return
        path, lines = self._segments[0]
        if count > lines - self._offset:
            raise ValueError(f"commit({count}) beyond the {lines - self._offset} peekable lines")
        self._offset += count
        if self._offset >= lines:
            path.unlink()
            self._segments.pop(0)
            self._offset = 0
            fsync_path(self.directory)
        self._write_offset()

    def _write_offset(self) -> None:
        target = self.directory / OFFSET_FILE
        if not self._segments:
            target.unlink(missing_ok=True)
            return
        tmp = target.with_suffix(".tmp")
        with tmp.open("w") as handle:
            handle.write(f"{self._segments[0][0].name} {self._offset}\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
