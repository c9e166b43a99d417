"""Where quark keeps converted models and service data; torch-free, so settings can use it."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``QUARK_CACHE_DIR``, else ``$XDG_CACHE_HOME/quark``, else ``~/.cache/quark``."""
    if os.environ.get("QUARK_CACHE_DIR"):
        return Path(os.environ["QUARK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quark"
