"""Durable writes: fsync files and directories before a rename makes them visible."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file directly under ``root``, then ``root`` itself."""
    for path in root.iterdir():
        if path.is_file():
            fsync_path(path)
    fsync_path(root)
