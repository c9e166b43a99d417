"""Reward statistics of pool records, for ``GET /admin/pool/stats``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quark.config import QuarkConfig
from quark.pool import PoolRecord, quantile_stats, quantize_as_configured


def _summary(rewards: Sequence[float]) -> dict[str, Any]:
    if not rewards:
        return {"scored": 0, "mean": None, "min": None, "max": None, "p50": None}
    ordered = sorted(rewards)
    return {
        "scored": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p50": ordered[len(ordered) // 2],
    }


def reward_distribution(records: Sequence[PoolRecord], config: QuarkConfig) -> dict[str, Any]:
    """Reward summaries of ``records``: per model version that generated them, per reward
    token they were generated with, and per Quark quantile (as training with ``config``
    would bin them)."""
    by_version: dict[str, list[PoolRecord]] = {}
    by_token: dict[str, list[PoolRecord]] = {}
    for record in records:
        by_version.setdefault(str(record.metadata.get("model_version")), []).append(record)
        token = record.metadata.get("reward_quantile")
        by_token.setdefault("none" if token is None else str(token), []).append(record)

    def block(group: list[PoolRecord]) -> dict[str, Any]:
        rewards = [r.reward for r in group if r.reward is not None]
        return {"records": len(group), **_summary(rewards)}

    scored = [r for r in records if r.reward is not None]
    enough = len(scored) >= config.num_quantiles
    quantiles = quantize_as_configured(scored, config) if enough else []
    return {
        "by_model_version": {v: block(g) for v, g in sorted(by_version.items())},
        "by_reward_token": {t: block(g) for t, g in sorted(by_token.items())},
        "quantiles": quantile_stats(quantiles, config.num_quantiles),
    }
