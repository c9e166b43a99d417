"""A clock for tests of anything that takes ``clock: Callable[[], float]``."""

from __future__ import annotations


class FakeClock:
    """Returns ``now``, which a test sets; with ``tick`` every read first advances it by that
    many seconds (a run whose steps each take ``tick`` seconds)."""

    def __init__(self, now: float = 0.0, tick: float = 0.0) -> None:
        self.now, self.tick = now, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now
