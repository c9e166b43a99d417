"""quark.service.redis_pool.RedisPool against the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from quark.pool import PoolRecord
from quark.service.redis_pool import START, RedisPool


@pytest.fixture
def pool(redis_client: redis.Redis) -> Iterator[RedisPool]:
    prefix = f"qs-pool-{uuid.uuid4().hex[:8]}"
    yield RedisPool(redis_client, prefix, max_records=None)
    keys = list(redis_client.scan_iter(f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)


def _records(count: int, start: int = 0) -> list[PoolRecord]:
    return [PoolRecord(prompt=f"p{i}", completion=f"c{i}") for i in range(start, start + count)]


def test_pool_protocol_order_and_rewards(pool: RedisPool) -> None:
    records = _records(5)
    pool.add(records)
    assert len(pool) == 5
    assert [r.record_id for r in pool.records()] == [r.record_id for r in records]
    pool.set_rewards({records[1].record_id: 0.5, records[3].record_id: -1.0})
    assert pool.get_rewards([r.record_id for r in records]) == {
        records[1].record_id: 0.5,
        records[3].record_id: -1.0,
    }
    assert [r.reward for r in pool.records()] == [None, 0.5, None, -1.0, None]
    with pytest.raises(ValueError):
        pool.set_rewards({records[0].record_id: float("nan")})


def test_read_since_cursor_and_newest_scored(pool: RedisPool) -> None:
    records = _records(7)
    pool.add(records)
    first = pool.read_since(START, 3)
    assert [r.prompt for _, r in first] == ["p0", "p1", "p2"]
    rest = pool.read_since(first[-1][0], 100)
    assert [r.prompt for _, r in rest] == ["p3", "p4", "p5", "p6"]
    pool.set_cursor("score", first[-1][0])
    assert pool.get_cursor("score") == first[-1][0] and pool.get_cursor("other") == START
    pool.set_rewards({r.record_id: float(i) for i, r in enumerate(records) if i % 2 == 0})
    assert [r.prompt for _, r in pool.newest_scored(2)] == ["p4", "p6"]
    stats = pool.stats()
    assert stats["records"] == 7 and stats["scored"] == 4 and stats["first_id"] == first[0][0]


def test_retention_bound_trims_oldest(redis_client: redis.Redis) -> None:
    prefix = f"qs-pool-{uuid.uuid4().hex[:8]}"
    pool = RedisPool(redis_client, prefix, max_records=50)
    try:
        for start in range(0, 1000, 100):
            pool.add(_records(100, start))
        # Approximate MAXLEN trims whole stream nodes (100 entries): bounded, not exact.
        assert 50 <= len(pool) <= 250
        assert pool.records()[-1].prompt == "p999"
    finally:
        redis_client.delete(pool.stream_key)


def test_rewards_of_trimmed_records_are_pruned(redis_client: redis.Redis) -> None:
    prefix = f"qs-pool-{uuid.uuid4().hex[:8]}"
    pool = RedisPool(redis_client, prefix, max_records=50)
    try:
        for start in range(0, 1000, 100):
            batch = _records(100, start)
            pool.add(batch)
            pool.set_rewards({r.record_id: 1.0 for r in batch})
        live = {r.record_id for r in pool.records()}
        stored = {k.decode() for k in redis_client.hkeys(pool.rewards_key)}
        # Bounded by twice the retention bound, and every live record keeps its reward.
        assert live <= stored and len(stored) <= 2 * 50 + 100
        assert pool.prune_rewards() == len(stored - live)
        assert {k.decode() for k in redis_client.hkeys(pool.rewards_key)} == live
    finally:
        redis_client.delete(pool.stream_key, pool.rewards_key)


def test_count_after_counts_the_backlog_across_chunks_up_to_the_limit(pool: RedisPool) -> None:
    pool.add(_records(1200))  # more than two XRANGE chunks
    cursor = pool.read_since(START, 100)[-1][0]
    assert pool.count_after(START) == 1200
    assert pool.count_after(cursor) == 1100
    assert pool.count_after(cursor, limit=700) == 700
    assert len(pool.records()) == 1200
