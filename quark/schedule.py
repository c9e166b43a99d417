"""Learning-rate schedules and the wall-clock budget of ``quark train --time-budget``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _whole_budget_left() -> float:
    return 1.0


def linear_warmup_decay(
    warmup: int, total: int, time_left: Callable[[], float] = _whole_budget_left
) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then linear decay to 0 at step ``total`` (official
    code), capped at ``time_left()`` (the share of a time budget still left, 1 without one),
    so a run that stops on a deadline also reaches 0 at the deadline."""

    def factor(step: int) -> float:
        if step < warmup:
            by_step = (step + 1) / warmup
        else:
            by_step = max(0.0, (total - step) / max(1, total - warmup))
        return min(by_step, time_left())

    return factor


@dataclass
class TimeBudget:
    """``seconds`` of wall time from creation. ``decay_lr``: the trainer's learning rate also
    decays linearly to 0 at the deadline (as a step budget decays it at its last step), where
    without it the rate stays at its peak until the run stops."""

    seconds: float
    decay_lr: bool = False
    clock: Callable[[], float] = time.monotonic
    start: float = field(init=False)

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"a time budget must be positive, got {self.seconds} s")
        self.start = self.clock()

    def left(self) -> float:
        """The share of the budget still left: 1 at the start, 0 at and after the deadline."""
        return max(0.0, 1.0 - (self.clock() - self.start) / self.seconds)

    def expired(self) -> bool:
        return self.left() == 0.0
