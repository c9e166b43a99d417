"""quark.intervals: percentile-bootstrap intervals over prompts, on hand-made numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quark.intervals import (
    Interval,
    bootstrap_ci,
    mean,
    paired_difference,
    relative_change,
)


def test_a_constant_sample_has_a_zero_width_interval() -> None:
    assert bootstrap_ci([0.25] * 20) == (0.25, 0.25, 0.25)
    estimate, low, high = bootstrap_ci([0.3] * 20)  # 20 x 0.3 / 20 rounds, but identically
    assert estimate == pytest.approx(0.3) and low == estimate == high
    assert bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)  # one prompt: nothing to resample


def test_two_values_hand_computed() -> None:
    # Resample means of [0, 1] are 0 (p=1/4), 0.5 (1/2) or 1 (1/4): the 2.5 % and 97.5 %
    # percentiles are the extremes.
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_the_interval_contains_the_true_mean_of_a_large_known_sample() -> None:
    sample = np.random.default_rng(1).normal(loc=2.0, scale=1.0, size=5000)
    estimate, low, high = bootstrap_ci(sample)
    assert low < 2.0 < high
    assert low < estimate < high
    # About +-1.96 standard errors: 1.96 / sqrt(5000) = 0.028 on each side.
    assert high - low == pytest.approx(2 * 1.96 / math.sqrt(5000), rel=0.15)
    narrower = bootstrap_ci(sample, level=0.5)
    assert low < narrower.low < narrower.high < high


def test_bootstrap_is_deterministic_given_a_seed() -> None:
    values = [0.1, 0.9, 0.4, 0.7, 0.2, 0.05]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)
    assert paired_difference(values, values[::-1], seed=5) == paired_difference(
        values, values[::-1], seed=5
    )


def test_bootstrap_with_another_statistic_and_rows() -> None:
    assert bootstrap_ci([1.0, 5.0, 3.0], stat=lambda v: float(np.max(v))).estimate == 5.0

    # Rows (numerator, denominator): a ratio of sums, as perplexity uses.
    def ratio(rows: np.ndarray) -> float:
        return float(rows[:, 0].sum() / rows[:, 1].sum())

    estimate, low, high = bootstrap_ci([[2.0, 1.0], [6.0, 3.0]], stat=ratio)
    assert (estimate, low, high) == (2.0, 2.0, 2.0)  # every prompt has ratio 2


def test_paired_difference_of_identical_arrays_is_exactly_zero() -> None:
    values = [0.13, 0.72, 0.5, 0.91, 0.0]
    assert paired_difference(values, values) == (0.0, 0.0, 0.0)
    assert relative_change(values, values) == (0.0, 0.0, 0.0)


def test_paired_difference_cancels_what_the_prompts_share() -> None:
    a = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2]
    b = [x + 0.05 for x in a]  # every prompt 0.05 higher, prompts themselves vary a lot
    diff, low, high = paired_difference(a, b)
    assert diff == pytest.approx(0.05)
    assert low == pytest.approx(0.05) and high == pytest.approx(0.05)
    # Unpaired, each run's own interval is far wider than the difference.
    own = bootstrap_ci(a)
    assert own.high - own.low > 0.3


def test_paired_difference_is_b_minus_a_and_relative_is_against_a() -> None:
    a, b = [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]
    assert paired_difference(a, b) == (1.0, 1.0, 1.0)
    assert paired_difference(b, a) == (-1.0, -1.0, -1.0)
    assert relative_change(a, b) == (1.0, 1.0, 1.0)  # +100 %
    assert relative_change(b, a) == (-0.5, -0.5, -0.5)
    # Ratio of means, not mean of ratios: 2.5 / 2 - 1 = 0.25, not (2/1 + 3/3) / 2 - 1 = 0.5.
    a, b = [1.0, 3.0], [2.0, 3.0]
    assert relative_change(a, b).estimate == pytest.approx(2.5 / 2.0 - 1.0)
    low, high = relative_change(a, b)[1:]
    assert low <= 0.25 <= high


def test_relative_change_against_a_zero_baseline_is_undefined() -> None:
    estimate, low, high = relative_change([0.0, 0.0], [0.5, 0.0])
    assert math.isnan(estimate) and math.isnan(low) and math.isnan(high)
    # The baseline mean is not 0, but some resamples draw only its zero prompt: unbounded.
    interval = relative_change([0.0, 1.0], [0.5, 1.0])
    assert interval.estimate == pytest.approx(0.5)
    assert math.isnan(interval.low) and math.isnan(interval.high)
    assert interval.as_dict() == {"value": pytest.approx(0.5), "low": None, "high": None}


@pytest.mark.parametrize("b", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
def test_mismatched_lengths_raise(b: list[float]) -> None:
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0, 2.0, 3.0], b)
    with pytest.raises(ValueError, match="same prompts"):
        relative_change([1.0, 2.0, 3.0], b)


def test_empty_and_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1.0, 2.0], resamples=0)


def test_interval_as_dict_and_mean() -> None:
    assert Interval(0.5, 0.25, 0.75).as_dict() == {"value": 0.5, "low": 0.25, "high": 0.75}
    assert mean(np.array([1.0, 2.0, 6.0])) == 3.0
