"""The data pool in Redis: a Stream of records plus a hash of their rewards.

Keys (``prefix`` is the service's ``QUARK_KEY_PREFIX``; names in :mod:`quark.service.keys`):

* the pool: a Stream; each entry has one field ``record`` = ``PoolRecord.to_json()``.
  XADD trims it with an approximate MAXLEN (the retention bound), oldest first.
* rewards: a hash record_id -> reward (scores arrive after the record, from the
  workers, so they live beside the immutable stream entry rather than in it). Rewards of
  trimmed records are pruned once the hash holds twice the retention bound.
* cursors: a hash name -> last stream id a consumer has processed.

Implements what the online loop needs (:class:`quark.online.scoring.OnlinePool`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import redis

from quark.pool import PoolRecord
from quark.service.keys import RedisKeys
from quark.service.redis_client import connect

START = "0-0"  # a stream id before every entry
_CHUNK = 500


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Mapping[Any, Any], name: str) -> str:
    """A stream entry's field, whether the client decodes responses or not."""
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        raise ValueError(f"pool stream entry without a {name!r} field: {fields!r}")
    return _text(value)


def _parse(entries: Any) -> list[tuple[str, PoolRecord]]:
    """(stream id, record) pairs of XRANGE entries, rewards not yet attached."""
    return [
        (_text(entry_id), PoolRecord.from_json(_field(fields, "record")))
        for entry_id, fields in entries
    ]


class RedisPool:
    """Pool records in a Redis Stream; see the module docstring for the key layout."""

    def __init__(self, client: redis.Redis, prefix: str, max_records: int | None = None) -> None:
        if max_records is not None and max_records < 1:
            raise ValueError(f"max_records must be >= 1 or None, got {max_records}")
        self.client = client
        self.prefix = prefix
        self.max_records = max_records
        keys = RedisKeys(prefix)
        self.stream_key = keys.pool
        self.rewards_key = keys.rewards
        self.cursors_key = keys.cursors

    @classmethod
    def from_url(
        cls, url: str, prefix: str, max_records: int | None = None, timeout_s: float = 5.0
    ) -> RedisPool:
        return cls(connect(url, read_timeout_s=timeout_s), prefix, max_records)

    # -- writing ---------------------------------------------------------------------------
    def add(self, records: Iterable[PoolRecord]) -> None:
        self.add_json([r.to_json() for r in records])

    def add_json(self, lines: Sequence[str]) -> list[str]:
        """XADD already-serialized records in one MULTI/EXEC (all or none); returns ids."""
        if not lines:
            return []
        pipe = self.client.pipeline(transaction=True)
        for line in lines:
            pipe.xadd(
                self.stream_key,
                {"record": line},
                maxlen=self.max_records,
                approximate=True,
            )
        return [_text(i) for i in pipe.execute()]

    def set_rewards(self, rewards: Mapping[str, float]) -> None:
        """Store rewards by record_id (NaN refused); prune those of trimmed records now and then."""
        for record_id, reward in rewards.items():
            if math.isnan(reward):
                raise ValueError(f"reward for record {record_id!r} is NaN")
        if not rewards:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.rewards_key, mapping={k: float(v) for k, v in rewards.items()})
        pipe.hlen(self.rewards_key)
        stored = pipe.execute()[1]
        # Amortised: a full prune runs once per ~max_records new rewards.
        if self.max_records and stored > 2 * self.max_records:
            self.prune_rewards()

    def prune_rewards(self) -> int:
        """Drop the rewards of records trimmed from the stream; returns how many went.

        The reward ids are read before the stream: a record scored in between is not in the
        snapshot, so it cannot be mistaken for a trimmed one (the stream only loses its oldest).
        """
        reward_ids = {_text(k) for k in self.client.hkeys(self.rewards_key)}
        live = {record.record_id for chunk in self._chunks() for _, record in _parse(chunk)}
        stale = reward_ids - live
        for start in range(0, len(stale), _CHUNK):
            self.client.hdel(self.rewards_key, *list(stale)[start : start + _CHUNK])
        return len(stale)

    # -- reading ---------------------------------------------------------------------------
    def get_rewards(self, record_ids: Sequence[str]) -> dict[str, float]:
        """Rewards of the given records that have one."""
        if not record_ids:
            return {}
        values = self.client.hmget(self.rewards_key, list(record_ids))
        return {rid: float(v) for rid, v in zip(record_ids, values, strict=True) if v is not None}

    def read_since(self, stream_id: str = START, count: int = 100) -> list[tuple[str, PoolRecord]]:
        """Up to ``count`` (stream id, record) pairs after ``stream_id``, oldest first,
        with their rewards filled in."""
        entries = self.client.xrange(self.stream_key, min=f"({stream_id}", count=count)
        return self._decode(entries)

    def newest_scored(self, count: int) -> list[tuple[str, PoolRecord]]:
        """The newest ``count`` records that have a reward, oldest first."""
        found: list[tuple[str, PoolRecord]] = []
        upper = "+"
        while len(found) < count:
            entries = self.client.xrevrange(self.stream_key, max=upper, count=_CHUNK)
            if not entries:
                break
            found += [(i, r) for i, r in self._decode(entries) if r.reward is not None]
            upper = f"({_text(entries[-1][0])}"
        return list(reversed(found[:count]))

    def newest(self, count: int) -> list[tuple[str, PoolRecord]]:
        """The newest ``count`` records, scored or not, oldest first (for statistics)."""
        entries = self.client.xrevrange(self.stream_key, count=count)
        return list(reversed(self._decode(entries or [])))

    def count_after(self, stream_id: str, limit: int = 100_000) -> int:
        """How many entries follow ``stream_id`` (e.g. a consumer's backlog), up to ``limit``."""
        counted = 0
        for chunk in self._chunks(after=stream_id):
            counted += len(chunk)
            if counted >= limit:
                break
        return min(counted, limit)

    def records(self) -> list[PoolRecord]:
        """Every record in the pool, oldest first (reads the whole stream: tests, small pools)."""
        return [record for chunk in self._chunks() for _, record in self._decode(chunk)]

    def _chunks(self, after: str = START) -> Iterator[Any]:
        """Raw XRANGE entries after ``after``, oldest first, ``_CHUNK`` at a time."""
        while entries := self.client.xrange(self.stream_key, min=f"({after}", count=_CHUNK):
            yield entries
            after = _text(entries[-1][0])

    def __len__(self) -> int:
        return int(self.client.xlen(self.stream_key))

    def _decode(self, entries: Any) -> list[tuple[str, PoolRecord]]:
        """Parsed entries with their rewards filled in."""
        pairs = _parse(entries)
        rewards = self.get_rewards([r.record_id for _, r in pairs])
        for _, record in pairs:
            if record.record_id in rewards:
                record.reward = rewards[record.record_id]
        return pairs

    # -- consumer cursors and stats ----------------------------------------------------------
    def get_cursor(self, name: str) -> str:
        value = self.client.hget(self.cursors_key, name)
        return START if value is None else _text(value)

    def set_cursor(self, name: str, value: str) -> None:
        self.client.hset(self.cursors_key, name, value)

    def stats(self) -> dict[str, Any]:
        """Length, retention bound, first/last stream ids and how many rewards are stored."""
        pipe = self.client.pipeline(transaction=False)
        pipe.xlen(self.stream_key)
        pipe.hlen(self.rewards_key)
        pipe.xrange(self.stream_key, count=1)
        pipe.xrevrange(self.stream_key, count=1)
        length, scored, first, last = pipe.execute()
        return {
            "records": int(length),
            "scored": int(scored),
            "max_records": self.max_records,
            "first_id": _text(first[0][0]) if first else None,
            "last_id": _text(last[0][0]) if last else None,
        }

    def ping(self) -> bool:
        return bool(self.client.ping())
