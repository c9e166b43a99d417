"""The reference-logit cache: hand-built tensors, then the invariant that a trainer with the
cache takes the same steps as one without."""

from __future__ import annotations

import copy

import pytest
import torch

from quark.config import QuarkConfig
from quark.models import QuarkModel, frozen_copy
from quark.pool import QuantizedSample
from quark.reference_cache import ReferenceCache
from quark.rewards import KeywordShareReward
from quark.training import QuarkTrainer

MASK = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])  # [B=2, T=3]: row 0 is one token short


class Reference:
    """Counts the rows it computes; row i's logits are i + 1 + position / 10."""

    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, rows: list[int]) -> torch.Tensor:
        self.rows += rows
        values = torch.tensor([[r + 1 + t / 10 for t in range(3)] for r in rows])  # [M, T]
        return values.unsqueeze(-1).expand(-1, -1, 4).clone()  # [M, T, V=4]


def test_cached_rows_come_back_at_their_positions_without_a_second_forward() -> None:
    cache, reference = ReferenceCache(max_bytes=1 << 20), Reference()
    first = cache.logits(["a", "b"], MASK, reference)
    assert reference.rows == [0, 1]
    assert first[0, 0].eq(0).all()  # not a completion position: left at 0
    assert torch.allclose(first[0, 1:, 0], torch.tensor([1.1, 1.2]))
    assert torch.allclose(first[1, :, 0], torch.tensor([2.0, 2.1, 2.2]))
    # The same samples in the other order: nothing computed, each row where its key goes.
    swapped = cache.logits(["b", "a"], MASK.flip(0), reference)
    assert reference.rows == [0, 1]
    assert torch.equal(swapped[0], first[1]) and torch.equal(swapped[1, 1:], first[0, 1:])
    assert (cache.hits, cache.misses, cache.hit_rate) == (2, 2, 0.5)


def test_only_missing_rows_are_computed() -> None:
    cache, reference = ReferenceCache(max_bytes=1 << 20), Reference()
    cache.logits(["a", "b"], MASK, reference)
    cache.logits(["c", "a"], MASK.flip(0), reference)  # "a" keeps its two positions
    assert reference.rows == [0, 1, 0]  # "c" only, as row 0 of the second batch


def test_the_least_recently_used_rows_leave_first() -> None:
    row_bytes = 3 * 4 * 4  # a full row: T=3 positions x V=4 float32
    cache, reference = ReferenceCache(max_bytes=2 * row_bytes), Reference()
    full = torch.ones(1, 3)
    for key in ["a", "b", "a", "c"]:  # "b" is the least recently used when "c" arrives
        cache.logits([key], full, reference)
    assert len(cache) == 2 and cache.bytes == 2 * row_bytes
    calls = len(reference.rows)
    cache.logits(["a"], full, reference)
    cache.logits(["c"], full, reference)
    assert len(reference.rows) == calls  # both kept
    cache.logits(["b"], full, reference)
    assert len(reference.rows) == calls + 1  # evicted, computed again


def test_a_zero_budget_keeps_nothing() -> None:
    cache, reference = ReferenceCache(max_bytes=0), Reference()
    cache.logits(["a"], MASK[:1], reference)
    cache.logits(["a"], MASK[:1], reference)
    assert reference.rows == [0, 0] and len(cache) == 0 and cache.hit_rate == 0.0
    with pytest.raises(ValueError):
        ReferenceCache(max_bytes=-1)


SAMPLES = [
    QuantizedSample("The cat sat on the", " mat and slept.", 0.9, 0),
    QuantizedSample("Hi", " there, friend", 0.8, 0),
    QuantizedSample("Rain", " falls", 0.7, 0),
]


def _trainer(qm: QuarkModel, cache_mb: int) -> QuarkTrainer:
    config = QuarkConfig(
        lr=1e-3, warmup_steps=0, steps=3, batch_size=3, reference_cache_mb=cache_mb
    )
    return QuarkTrainer(qm, frozen_copy(qm), KeywordShareReward("the"), [], config)


def test_a_trainer_with_the_cache_takes_the_steps_of_one_without(tiny_qm: QuarkModel) -> None:
    cached, uncached = _trainer(copy.deepcopy(tiny_qm), 64), _trainer(tiny_qm, 0)
    for _ in range(3):  # the same samples every step: steps 2 and 3 read the cache
        a, b = cached.train_step(SAMPLES), uncached.train_step(SAMPLES)
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.kl == pytest.approx(b.kl, abs=1e-6)
    assert cached.reference_cache.hits == 6 and uncached.reference_cache.hits == 0
    assert a.kl > 0  # the policy moved: the cached reference is still the original's
