"""Data pool of sampled completions and their quantization into reward quantiles.

The pool is the Quark "data pool" (Lu et al., NeurIPS 2022): every completion the
model produces is added, scored later by a reward model, and periodically sorted by
reward and split into quantiles that become the reward tokens used for training.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict
from uuid import uuid4

from quark.config import NOVELTY_MIN_HOLDERS, QuarkConfig
from quark.rewards.text import ngrams

#: Word n-gram length of the novelty term (dist-3, the diversity the evaluation reports).
NOVELTY_NGRAM = 3

_REQUIRED_FIELDS = ("prompt", "completion")
_OPTIONAL_FIELDS = ("reward", "metadata", "record_id")


@dataclass
class PoolRecord:
    """One sampled completion, its reward (None until scored) and provenance."""

    prompt: str
    completion: str
    reward: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    record_id: str = field(default_factory=lambda: uuid4().hex)

    def to_json(self) -> str:
        """Serialize to a strict JSON object (NaN/inf rewards are rejected)."""
        return json.dumps(asdict(self), allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> PoolRecord:
        """Parse a record written by `to_json`; raise ValueError on bad input."""
        try:
            data = json.loads(s)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"PoolRecord.from_json: input is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(
                f"PoolRecord.from_json: expected a JSON object, got {type(data).__name__}"
            )
        _check_record_fields(data)
        return cls(
            prompt=data["prompt"],
            completion=data["completion"],
            reward=None if data.get("reward") is None else float(data["reward"]),
            metadata=data.get("metadata", {}),
            record_id=data.get("record_id", uuid4().hex),
        )


def _check_record_fields(data: dict[str, Any]) -> None:
    """Validate the keys and value types of a decoded PoolRecord object."""
    where = "PoolRecord.from_json"
    unknown = sorted(set(data) - set(_REQUIRED_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}")
    for name in _REQUIRED_FIELDS:
        if not isinstance(data.get(name), str):
            raise ValueError(f"{where}: field {name!r} is missing or not a string")
    reward = data.get("reward")
    # bool is an int subclass; a true/false reward is almost surely a bug upstream.
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, int | float)):
        raise ValueError(f"{where}: field 'reward' must be a number or null, got {reward!r}")
    if not isinstance(data.get("metadata", {}), dict):
        raise ValueError(f"{where}: field 'metadata' must be a JSON object")
    if not isinstance(data.get("record_id", ""), str):
        raise ValueError(f"{where}: field 'record_id' must be a string")


class InMemoryPool:
    """Thread-safe in-process pool, optionally bounded to the newest `max_size` records."""

    def __init__(self, max_size: int | None = None) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1 or None (unbounded), got {max_size}")
        self.max_size = max_size
        # Insertion-ordered by record_id: oldest first, O(1) lookup for set_rewards.
        self._records: OrderedDict[str, PoolRecord] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, records: Iterable[PoolRecord]) -> None:
        """Append records; when bounded, evict the oldest beyond `max_size`."""
        batch = list(records)
        with self._lock:
            self._check_new_ids(batch)
            for record in batch:
                self._records[record.record_id] = record
            while self.max_size is not None and len(self._records) > self.max_size:
                self._records.popitem(last=False)

    def _check_new_ids(self, batch: list[PoolRecord]) -> None:
        """Reject the whole batch if any record_id is duplicated, so add() is atomic."""
        seen: set[str] = set()
        for record in batch:
            if record.record_id in self._records or record.record_id in seen:
                raise ValueError(f"duplicate record_id {record.record_id!r} in pool")
            seen.add(record.record_id)

    def records(self) -> list[PoolRecord]:
        """All records, oldest first."""
        with self._lock:
            return list(self._records.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def set_rewards(self, rewards: Mapping[str, float]) -> None:
        """Set rewards by record_id; ids no longer in the pool are skipped.

        Skipping is deliberate: in a bounded pool a record can be evicted while its
        completion is being scored. Updated records are stored as copies so lists
        returned earlier by `records()` do not change underneath their holder.
        """
        for record_id, reward in rewards.items():
            if math.isnan(reward):
                raise ValueError(f"reward for record {record_id!r} is NaN")
        with self._lock:
            for record_id, reward in rewards.items():
                if record_id in self._records:
                    old = self._records[record_id]
                    self._records[record_id] = replace(old, reward=float(reward))

    def unscored(self) -> list[PoolRecord]:
        """Records still waiting for a reward, oldest first."""
        return [r for r in self.records() if r.reward is None]

    def scored(self) -> list[PoolRecord]:
        """Records that have a reward, oldest first."""
        return [r for r in self.records() if r.reward is not None]


@dataclass(frozen=True)
class QuantizedSample:
    """A scored record assigned to a reward quantile (0 = highest reward)."""

    prompt: str
    completion: str
    reward: float
    quantile: int


class QuantileStats(TypedDict):
    """Reward summary of one quantile; mean/min/max are None when it is empty."""

    quantile: int
    count: int
    mean: float | None
    min: float | None
    max: float | None


def quantize(
    records: Sequence[PoolRecord],
    num_quantiles: int,
    by_prompt: bool = False,
    novelty_coef: float = 0.0,
    novelty_min_holders: int = NOVELTY_MIN_HOLDERS,
) -> list[QuantizedSample]:
    """Assign scored records to `num_quantiles` reward quantiles as in the Quark paper.

    Records are sorted by reward, highest first (stable, so ties keep pool order),
    and cut into quantiles of n // K records; the n % K leftovers join the lowest
    quantile K-1. Unscored records are ignored. Returns samples highest reward first.

    ``by_prompt`` sorts by reward minus the mean reward of the same prompt's records
    instead: the best quantile then holds the best continuations *of each prompt*, toxic
    prompts included, rather than mostly the continuations of harmless prompts.

    ``novelty_coef`` > 0 lowers each key by ``novelty_coef`` times the completion's
    :func:`shared_ngram_shares` (its word 3-grams that ``novelty_min_holders`` scored
    completions hold), so of two equally clean completions the one that repeats what the pool
    already holds ranks lower. ``QuantizedSample.reward`` stays the reward itself.
    """
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
    # Pair each record with its (narrowed, non-None) reward so sorting is type-safe.
    scored = [(float(r.reward), r) for r in records if r.reward is not None]
    for reward, record in scored:
        if math.isnan(reward):
            raise ValueError(f"record {record.record_id!r} has a NaN reward")
    if len(scored) < num_quantiles:
        raise ValueError(
            f"quantize needs at least {num_quantiles} scored records for "
            f"{num_quantiles} quantiles, got {len(scored)}"
        )
    keys = _relative_rewards(scored) if by_prompt else [reward for reward, _ in scored]
    if novelty_coef:
        shares = shared_ngram_shares([r.completion for _, r in scored], novelty_min_holders)
        keys = [key - novelty_coef * share for key, share in zip(keys, shares, strict=True)]
    order = sorted(range(len(scored)), key=lambda i: keys[i], reverse=True)
    ordered = [scored[i] for i in order]
    size = len(ordered) // num_quantiles
    return [
        QuantizedSample(
            prompt=r.prompt,
            completion=r.completion,
            reward=reward,
            quantile=min(i // size, num_quantiles - 1),
        )
        for i, (reward, r) in enumerate(ordered)
    ]


def quantize_as_configured(
    records: Sequence[PoolRecord], config: QuarkConfig
) -> list[QuantizedSample]:
    """:func:`quantize` with ``config``'s ranking options: the one binning that training and
    the pool statistics share."""
    return quantize(
        records,
        config.num_quantiles,
        by_prompt=config.quantile_scope == "prompt",
        novelty_coef=config.novelty_coef,
        novelty_min_holders=config.novelty_min_holders,
    )


def _relative_rewards(scored: Sequence[tuple[float, PoolRecord]]) -> list[float]:
    """Each reward minus the mean reward of the records with the same prompt."""
    totals: dict[str, list[float]] = {}
    for reward, record in scored:
        totals.setdefault(record.prompt, []).append(reward)
    means = {prompt: sum(values) / len(values) for prompt, values in totals.items()}
    return [reward - means[record.prompt] for reward, record in scored]


def shared_ngram_shares(
    completions: Sequence[str], min_holders: int, n: int = NOVELTY_NGRAM
) -> list[float]:
    """For each completion, the share of its distinct word ``n``-grams that at least
    ``min_holders`` (>= 2) completions of ``completions`` hold, itself included (2: any other).

    A completion too short to have an ``n``-gram (an empty one included) counts as 1.0: it adds
    nothing new, and scoring it 0 would rank the emptiest text as the most novel.
    """
    if min_holders < 2:
        raise ValueError(f"min_holders must be >= 2 (itself and another), got {min_holders}")
    grams = [set(ngrams(text.split(), n)) for text in completions]
    holders = Counter(gram for own in grams for gram in own)  # completions holding each
    return [sum(holders[g] >= min_holders for g in own) / len(own) if own else 1.0 for own in grams]


def quantile_stats(samples: Sequence[QuantizedSample], num_quantiles: int) -> list[QuantileStats]:
    """Per-quantile count and mean/min/max reward, for logging "reward by quantile"."""
    by_quantile: list[list[float]] = [[] for _ in range(num_quantiles)]
    for sample in samples:
        if not 0 <= sample.quantile < num_quantiles:
            raise ValueError(f"sample quantile {sample.quantile} is outside 0..{num_quantiles - 1}")
        by_quantile[sample.quantile].append(sample.reward)
    return [_stats(q, rewards) for q, rewards in enumerate(by_quantile)]


def _stats(quantile: int, rewards: list[float]) -> QuantileStats:
    """Summary of one quantile's rewards."""
    if not rewards:
        return QuantileStats(quantile=quantile, count=0, mean=None, min=None, max=None)
    return QuantileStats(
        quantile=quantile,
        count=len(rewards),
        mean=sum(rewards) / len(rewards),
        min=min(rewards),
        max=max(rewards),
    )
