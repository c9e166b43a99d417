"""A clean environment for the service processes tests and benchmarks start."""

from __future__ import annotations

import os
from collections.abc import Mapping


def isolated_env(*layers: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without the developer's own QUARK_* settings, then each of
    ``layers`` in turn (a later one overrides an earlier one).

    QUARK_CACHE_DIR is kept: the converted default model is shared, not rebuilt per run.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUARK_")}
    if os.environ.get("QUARK_CACHE_DIR"):
        env["QUARK_CACHE_DIR"] = os.environ["QUARK_CACHE_DIR"]
    for layer in layers:
        env.update(layer)
    return env
