"""Percentile-bootstrap confidence intervals over prompts, for one run and for paired runs.

The unit of resampling is the prompt: a prompt's samples share its difficulty, so they are not
independent draws, and resampling completions would give intervals that are too narrow.
Two runs on the *same* prompts are compared with a paired bootstrap: each resample draws one
set of prompt indices and evaluates both runs on it, so the prompt-to-prompt variation that
both runs share cancels out of the difference.

Every function takes a ``stat`` that maps the resampled per-prompt values (a 1-D array, or a
2-D array with one row per prompt when a statistic needs several columns, e.g. perplexity
from per-prompt NLL and token counts) to a float; the default is the mean over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

Stat = Callable[[np.ndarray], float]

RESAMPLES = 2000
LEVEL = 0.95


class Interval(NamedTuple):
    """A point estimate and its confidence interval (``low <= high``; NaN when undefined)."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | None]:
        """``{"value", "low", "high"}`` with None for NaN (JSON has no NaN)."""
        return {
            "value": _finite_or_none(self.estimate),
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
        }


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def mean(values: np.ndarray) -> float:
    """Mean over prompts (axis 0)."""
    return float(np.mean(values))


def _as_array(values: npt.ArrayLike, name: str = "per_prompt") -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D (or 2-D, one row per prompt), got {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: an interval needs at least one prompt")
    return array


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` prompt indices drawn with replacement."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _resampled(values: np.ndarray, index: np.ndarray, stat: Stat) -> np.ndarray:
    """``stat`` of ``values`` on every row of prompt indices (vectorised for the mean)."""
    if stat is mean and values.ndim == 1:
        return np.asarray(values[index].mean(axis=1), dtype=float)
    return np.array([stat(values[row]) for row in index], dtype=float)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not np.all(np.isfinite(draws)):
        return math.nan, math.nan  # e.g. a ratio whose denominator is 0 in some resamples
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_ci(
    per_prompt: npt.ArrayLike,
    stat: Stat = mean,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """``stat`` of the per-prompt values and its percentile-bootstrap interval over prompts."""
    values = _as_array(per_prompt)
    draws = _resampled(values, _indices(values.shape[0], resamples, seed), stat)
    return Interval(stat(values), *_percentiles(draws, level))


def _paired(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    first, second = _as_array(a, "a"), _as_array(b, "b")
    if first.shape != second.shape:
        raise ValueError(
            f"paired runs need the same prompts in the same order: shapes {first.shape} "
            f"and {second.shape} differ"
        )
    return first, second


def paired_difference(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    stat: Stat = mean,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """``stat(b) - stat(a)`` on the same prompts, with a paired bootstrap interval.

    ``a[i]`` and ``b[i]`` must belong to the same prompt (ValueError on a length mismatch).
    For the mean this is the bootstrap of the per-prompt differences ``b[i] - a[i]``.
    """
    first, second = _paired(a, b)
    index = _indices(first.shape[0], resamples, seed)
    draws = _resampled(second, index, stat) - _resampled(first, index, stat)
    return Interval(stat(second) - stat(first), *_percentiles(draws, level))


def relative_change(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    stat: Stat = mean,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """``(stat(b) - stat(a)) / stat(a)`` on the same prompts, bootstrapping the ratio.

    Each resample evaluates ``stat(b) / stat(a) - 1`` on one draw of prompts (for the mean:
    the ratio of means, not the mean of per-prompt ratios). The estimate is NaN when
    ``stat(a)`` is 0, and the interval is NaN when it is 0 in any resample (unbounded).
    """
    first, second = _paired(a, b)
    index = _indices(first.shape[0], resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        base = _resampled(first, index, stat)
        draws = _resampled(second, index, stat) / base - 1.0
        base_estimate = stat(first)
        estimate = stat(second) / base_estimate - 1.0 if base_estimate != 0 else math.nan
    return Interval(float(estimate), *_percentiles(draws, level))
