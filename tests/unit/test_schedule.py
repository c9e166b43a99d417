import pytest

from quark.schedule import TimeBudget, linear_warmup_decay
from testkit.clock import FakeClock


def test_linear_warmup_decay() -> None:
    factor = linear_warmup_decay(4, 12)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(8) == pytest.approx(0.5)
    assert factor(12) == 0.0 and factor(20) == 0.0


def test_linear_warmup_decay_is_capped_by_the_time_left() -> None:
    left = [1.0]
    factor = linear_warmup_decay(4, 100_000, lambda: left[0])
    assert factor(1) == 0.5  # warmup below the cap
    left[0] = 0.3
    assert factor(1) == 0.3 and factor(50) == 0.3
    left[0] = 0.0
    assert factor(50) == 0.0


def test_time_budget_share_left() -> None:
    clock = FakeClock(now=100.0)
    budget = TimeBudget(60.0, clock=clock)
    assert budget.left() == 1.0 and not budget.expired()
    clock.now += 15
    assert budget.left() == pytest.approx(0.75)
    clock.now += 45
    assert budget.left() == 0.0 and budget.expired()
    clock.now += 100
    assert budget.left() == 0.0


def test_time_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeBudget(0.0)
