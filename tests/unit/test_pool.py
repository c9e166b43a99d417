"""Tests for the data pool and Quark reward quantization."""

from __future__ import annotations

import json
import math
import threading

import pytest

from quark.pool import (
    InMemoryPool,
    PoolRecord,
    QuantizedSample,
    quantile_stats,
    quantize,
)


def _records(rewards: list[float | None]) -> list[PoolRecord]:
    """Records whose completion is their pool position, so order is easy to check."""
    return [PoolRecord(prompt="p", completion=str(i), reward=r) for i, r in enumerate(rewards)]


# --- quantize ---------------------------------------------------------------------


def test_quantize_sizes_remainder_goes_to_lowest_quantile() -> None:
    samples = quantize(_records([float(i) for i in range(11)]), num_quantiles=5)
    sizes = [sum(s.quantile == q for s in samples) for q in range(5)]
    assert sizes == [2, 2, 2, 2, 3]


def test_quantize_top_quantile_has_highest_rewards() -> None:
    rewards = [0.3, 0.9, 0.1, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6, 0.0, 1.0]
    samples = quantize(_records(rewards), num_quantiles=5)
    assert [s.reward for s in samples] == sorted(rewards, reverse=True)
    assert {s.reward for s in samples if s.quantile == 0} == {1.0, 0.9}
    assert {s.reward for s in samples if s.quantile == 4} == {0.2, 0.1, 0.0}
    # Every reward in a higher quantile beats every reward in a lower one.
    for q in range(4):
        better = [s.reward for s in samples if s.quantile == q]
        worse = [s.reward for s in samples if s.quantile == q + 1]
        assert min(better) > max(worse)


def test_quantize_ties_keep_pool_order() -> None:
    samples = quantize(_records([0.5, 1.0, 0.5, 0.5, 1.0, 0.5]), num_quantiles=3)
    assert [s.completion for s in samples] == ["1", "4", "0", "2", "3", "5"]
    assert [s.quantile for s in samples] == [0, 0, 1, 1, 2, 2]


def test_quantize_returns_sample_fields() -> None:
    record = PoolRecord(prompt="hello", completion=" world", reward=2)
    (sample,) = quantize([record], num_quantiles=1)
    assert sample == QuantizedSample(prompt="hello", completion=" world", reward=2.0, quantile=0)
    assert isinstance(sample.reward, float)


def test_quantize_ignores_unscored_records() -> None:
    samples = quantize(_records([None, 3.0, None, 2.0, 1.0, None]), num_quantiles=3)
    assert [(s.completion, s.quantile) for s in samples] == [("1", 0), ("3", 1), ("4", 2)]


def test_quantize_exact_multiple_has_equal_sizes() -> None:
    samples = quantize(_records([float(i) for i in range(10)]), num_quantiles=5)
    assert [s.quantile for s in samples] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_quantize_too_few_scored_records() -> None:
    with pytest.raises(ValueError, match=r"at least 5 scored records.*got 4"):
        quantize(_records([1.0, 2.0, 3.0, 4.0, None, None]), num_quantiles=5)


def test_quantize_rejects_nan_reward() -> None:
    with pytest.raises(ValueError, match="NaN"):
        quantize(_records([1.0, math.nan, 2.0]), num_quantiles=1)


def test_quantize_rejects_bad_num_quantiles() -> None:
    with pytest.raises(ValueError, match="num_quantiles"):
        quantize(_records([1.0]), num_quantiles=0)


def test_quantile_stats() -> None:
    samples = quantize(_records([float(i) for i in range(11)]), num_quantiles=5)
    stats = quantile_stats(samples, num_quantiles=5)
    assert [s["quantile"] for s in stats] == [0, 1, 2, 3, 4]
    assert [s["count"] for s in stats] == [2, 2, 2, 2, 3]
    assert stats[0] == {"quantile": 0, "count": 2, "mean": 9.5, "min": 9.0, "max": 10.0}
    assert stats[4] == {"quantile": 4, "count": 3, "mean": 1.0, "min": 0.0, "max": 2.0}


def test_quantile_stats_empty_quantile_and_bad_index() -> None:
    sample = QuantizedSample(prompt="p", completion="c", reward=1.0, quantile=0)
    stats = quantile_stats([sample], num_quantiles=2)
    assert stats[1] == {"quantile": 1, "count": 0, "mean": None, "min": None, "max": None}
    with pytest.raises(ValueError, match=r"outside 0\.\.0"):
        quantile_stats([sample, QuantizedSample("p", "c", 1.0, quantile=1)], num_quantiles=1)


# --- InMemoryPool -----------------------------------------------------------------


def test_pool_implements_protocol_and_keeps_order() -> None:
    pool = InMemoryPool()
    first, second = _records([None, None]), _records([None])
    pool.add(first)
    pool.add(iter(second))  # any iterable, including a one-shot generator
    assert len(pool) == 3
    assert pool.records() == [*first, *second]


def test_pool_bound_keeps_newest() -> None:
    pool = InMemoryPool(max_size=3)
    records = _records([float(i) for i in range(5)])
    pool.add(records[:2])
    pool.add(records[2:])
    assert len(pool) == 3
    assert [r.completion for r in pool.records()] == ["2", "3", "4"]


def test_pool_bound_larger_batch_than_bound() -> None:
    pool = InMemoryPool(max_size=2)
    pool.add(_records([None] * 5))
    assert [r.completion for r in pool.records()] == ["3", "4"]


@pytest.mark.parametrize("max_size", [0, -1])
def test_pool_rejects_bad_bound(max_size: int) -> None:
    with pytest.raises(ValueError, match="max_size"):
        InMemoryPool(max_size=max_size)


def test_pool_set_rewards_scored_unscored() -> None:
    pool = InMemoryPool()
    records = _records([None, None, None])
    pool.add(records)
    before = pool.records()
    pool.set_rewards({records[0].record_id: 0.25, records[2].record_id: 1})
    assert [r.completion for r in pool.scored()] == ["0", "2"]
    assert [r.completion for r in pool.unscored()] == ["1"]
    assert [r.reward for r in pool.records()] == [0.25, None, 1.0]
    assert before[0].reward is None  # earlier snapshots are not mutated


def test_pool_set_rewards_skips_evicted_ids() -> None:
    pool = InMemoryPool(max_size=1)
    old, new = _records([None, None])
    pool.add([old])
    pool.add([new])
    pool.set_rewards({old.record_id: 1.0, new.record_id: 2.0})
    assert [r.reward for r in pool.records()] == [2.0]


def test_pool_set_rewards_rejects_nan() -> None:
    pool = InMemoryPool()
    (record,) = _records([None])
    pool.add([record])
    with pytest.raises(ValueError, match="NaN"):
        pool.set_rewards({record.record_id: math.nan})
    assert pool.records()[0].reward is None


def test_pool_rejects_duplicate_ids_atomically() -> None:
    pool = InMemoryPool()
    (record,) = _records([None])
    pool.add([record])
    with pytest.raises(ValueError, match="duplicate record_id"):
        pool.add([PoolRecord("p", "new"), record])
    assert len(pool) == 1
    with pytest.raises(ValueError, match="duplicate record_id"):
        pool.add([PoolRecord("p", "a", record_id="x"), PoolRecord("p", "b", record_id="x")])


def test_pool_concurrent_adds() -> None:
    pool = InMemoryPool(max_size=50)
    threads = [threading.Thread(target=pool.add, args=(_records([None] * 20),)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(pool) == 50


def test_pool_feeds_quantize() -> None:
    pool = InMemoryPool()
    records = _records([None] * 4)
    pool.add(records)
    pool.set_rewards({r.record_id: float(i) for i, r in enumerate(records[:3])})
    samples = quantize(pool.records(), num_quantiles=3)
    assert [(s.completion, s.quantile) for s in samples] == [("2", 0), ("1", 1), ("0", 2)]


# --- PoolRecord JSON --------------------------------------------------------------


def test_record_defaults() -> None:
    a, b = PoolRecord("p", "c"), PoolRecord("p", "c")
    assert a.reward is None and a.metadata == {}
    assert a.record_id != b.record_id
    assert a.metadata is not b.metadata


@pytest.mark.parametrize("reward", [None, -0.5, 3.0])
def test_record_json_round_trip(reward: float | None) -> None:
    record = PoolRecord(
        prompt="Tell me ✓",
        completion=' a "quoted"\nline',
        reward=reward,
        metadata={"model_version": 3, "reward_token": "_TREE_TOKEN_0", "top_p": 0.9},
    )
    assert PoolRecord.from_json(record.to_json()) == record


def test_record_from_json_minimal_and_int_reward() -> None:
    record = PoolRecord.from_json('{"prompt": "p", "completion": "c", "reward": 1}')
    assert record.reward == 1.0 and isinstance(record.reward, float)
    assert record.metadata == {} and record.record_id


def test_record_to_json_rejects_nan() -> None:
    with pytest.raises(ValueError):
        PoolRecord("p", "c", reward=math.nan).to_json()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "p"}', "'completion' is missing"),
        ('{"prompt": 1, "completion": "c"}', "'prompt' is missing or not a string"),
        ('{"prompt": "p", "completion": "c", "reward": "high"}', "'reward' must be a number"),
        ('{"prompt": "p", "completion": "c", "reward": true}', "'reward' must be a number"),
        ('{"prompt": "p", "completion": "c", "metadata": []}', "'metadata' must be"),
        ('{"prompt": "p", "completion": "c", "record_id": 7}', "'record_id' must be"),
        ('{"prompt": "p", "completion": "c", "rewrd": 1}', "unknown field"),
    ],
)
def test_record_from_json_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PoolRecord.from_json(text)


def test_record_to_json_is_plain_json() -> None:
    record = PoolRecord("p", "c", reward=0.5, record_id="abc")
    assert json.loads(record.to_json()) == {
        "prompt": "p",
        "completion": "c",
        "reward": 0.5,
        "metadata": {},
        "record_id": "abc",
    }
