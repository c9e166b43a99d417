"""Scoring the pool and continuous mode's trigger (plain functions over an ``OnlinePool``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from quark.pool import PoolRecord
from quark.rewards import RewardFn


class OnlinePool(Protocol):
    """What the online loop needs from the pool (``quark.service.redis_pool.RedisPool``)."""

    def read_since(self, cursor: str, count: int) -> list[tuple[str, PoolRecord]]: ...

    def get_rewards(self, record_ids: Sequence[str]) -> dict[str, float]: ...

    def set_rewards(self, rewards: Mapping[str, float]) -> None: ...

    def get_cursor(self, name: str) -> str: ...

    def set_cursor(self, name: str, value: str) -> None: ...

    def newest_scored(self, count: int) -> list[tuple[str, PoolRecord]]: ...


# -- scoring ---------------------------------------------------------------------------------
def score_pending(
    pool: OnlinePool, reward_fn: RewardFn, batch_size: int, cursor_name: str = "score"
) -> int:
    """Score every record after the scoring cursor; returns how many got a reward.

    Idempotent: a record that already has a reward is skipped, and the cursor only moves
    after a batch's rewards are stored, so a crash re-reads at most one batch and scores
    nothing twice. Callers serialize concurrent scorers with a lock.
    """
    scored = 0
    cursor = pool.get_cursor(cursor_name)
    while batch := pool.read_since(cursor, batch_size):
        have = pool.get_rewards([r.record_id for _, r in batch])
        todo = unique_records([r for _, r in batch if r.record_id not in have and r.reward is None])
        if todo:
            values = reward_fn([r.prompt for r in todo], [r.completion for r in todo])
            rewards = {
                r.record_id: float(v) for r, v in zip(todo, values, strict=True) if math.isfinite(v)
            }
            pool.set_rewards(rewards)
            scored += len(rewards)
        cursor = batch[-1][0]
        pool.set_cursor(cursor_name, cursor)
    return scored


# -- continuous mode -------------------------------------------------------------------------
def trigger_reason(
    now: float,
    last_at: float,
    last_scored: int,
    scored_total: int,
    interval_s: float,
    min_new: int,
) -> str | None:
    """Why continuous mode should start a job now, or None: ``min_new`` new scored records,
    or ``interval_s`` elapsed with at least one new record (retraining on the same data
    would only re-fit it)."""
    new = scored_total - last_scored if scored_total >= last_scored else scored_total
    if new >= min_new:
        return f"{new} new scored records (threshold {min_new})"
    if new > 0 and now - last_at >= interval_s:
        return f"{now - last_at:.0f}s since the last job ({new} new scored records)"
    return None


def unique_records(records: Sequence[PoolRecord]) -> list[PoolRecord]:
    """First copy of each record_id: pool logging is at-least-once (a write that reached
    Redis just before it went away is replayed from the spool), so a record can repeat."""
    seen: set[str] = set()
    out = []
    for record in records:
        if record.record_id not in seen:
            seen.add(record.record_id)
            out.append(record)
    return out
