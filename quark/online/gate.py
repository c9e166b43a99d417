"""The promotion gate and the held-out split of the pool (plain functions; torch-free)."""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quark.version_eval import EvalResult

#: Salt of the held-out split: changing it would move prompts between training and evaluation.
HELD_OUT_SALT = "quark-eval"
#: The split reads this many bytes of the prompt's sha256 as a fraction in [0, 1).
_SPLIT_BYTES = 8


#: One-sided confidence of the reward test's lower bound (``UnlearnParams.gate_confidence``).
DEFAULT_CONFIDENCE = 0.95
#: Non-inferiority margin in reward units (``UnlearnParams.reward_tolerance``).
DEFAULT_MARGIN = 0.02
#: Cap of the mean per-token KL to the original model (``UnlearnParams.max_kl``).
DEFAULT_MAX_KL = 2.0
#: Above this many degrees of freedom the t quantile uses its expansion around the normal one.
_EXACT_T_DF = 300


@dataclass(frozen=True)
class RewardTest:
    """The paired non-inferiority test of the held-out reward.

    ``d_i = candidate_i - active_i`` for each held-out prompt ``i`` (its mean reward over its
    samples; both versions sampled it with the same seed). ``bound`` is the one-sided lower
    ``confidence`` bound of mean(d) from a t-interval with ``n - 1`` degrees of freedom; the
    test passes when ``bound >= -margin``. With fewer than 2 prompts there is no bound (-inf).
    """

    n: int  # paired prompts
    estimate: float  # mean(d): candidate's mean reward - the active version's
    stderr: float  # sd(d) / sqrt(n)
    bound: float  # estimate - t_quantile(confidence, n - 1) * stderr
    confidence: float
    margin: float

    @property
    def passed(self) -> bool:
        return self.bound >= -self.margin  # NaN fails

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: a non-finite number (no bound with n < 2) becomes None."""
        values = {name: _finite_or_none(getattr(self, name)) for name in _TEST_FIELDS}
        return {**values, "passed": self.passed}


_TEST_FIELDS = ("n", "estimate", "stderr", "bound", "confidence", "margin")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    reward_test: RewardTest | None = None  # None when an evaluation was not finite

    def as_dict(self) -> dict[str, Any]:
        test = self.reward_test.as_dict() if self.reward_test is not None else None
        return {"passed": self.passed, "reasons": list(self.reasons), "reward_test": test}


def paired_reward_test(
    candidate: EvalResult,
    active: EvalResult,
    *,
    margin: float = DEFAULT_MARGIN,
    confidence: float = DEFAULT_CONFIDENCE,
) -> RewardTest:
    """The non-inferiority test of ``candidate`` against ``active`` (see :class:`RewardTest`).

    Raises ValueError unless both carry per-prompt rewards for the same number of prompts.
    """
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence={confidence} must be in [0.5, 1)")
    ours, theirs = candidate.prompt_rewards, active.prompt_rewards
    if not ours or not theirs:
        raise ValueError("the paired reward test needs per-prompt rewards of both versions")
    if len(ours) != len(theirs):
        raise ValueError(
            f"the candidate was evaluated on {len(ours)} prompts and the active version on "
            f"{len(theirs)}: the paired test needs the same prompts"
        )
    diffs = [c - a for c, a in zip(ours, theirs, strict=True)]
    n = len(diffs)
    estimate = math.fsum(diffs) / n
    if n < 2:
        return RewardTest(n, estimate, math.inf, -math.inf, confidence, margin)
    variance = math.fsum((d - estimate) ** 2 for d in diffs) / (n - 1)
    stderr = math.sqrt(variance / n)
    # All differences equal: stderr is 0 and the bound is the estimate.
    bound = estimate - t_quantile(confidence, n - 1) * stderr
    return RewardTest(n, estimate, stderr, bound, confidence, margin)


def promotion_gate(
    candidate: EvalResult,
    active: EvalResult,
    *,
    reward_tolerance: float = DEFAULT_MARGIN,
    confidence: float = DEFAULT_CONFIDENCE,
    max_perplexity_rise: float = 0.25,
    max_kl: float | None = DEFAULT_MAX_KL,
) -> GateDecision:
    """Promote ``candidate`` only if all of these hold:

    - **reward, non-inferior:** on the held-out prompts, the one-sided lower ``confidence``
      bound of the mean paired difference (candidate - active, per prompt) is at least
      ``-reward_tolerance`` (:func:`paired_reward_test`). So a candidate worse by the margin
      or more is promoted with probability at most about ``1 - confidence``; a candidate
      that is no worse needs enough prompts to show it (docs/gate.md sizes them).
      ``confidence=0.5`` with ``reward_tolerance=0`` is the plain comparison of the means.
    - **fluency:** its perplexity under the original rose by at most ``max_perplexity_rise``
      (relative to the active version's);
    - **drift:** unless ``max_kl`` is None, its mean per-token KL to the original model is at
      most ``max_kl``.

    The first two compare with the active version, so small steps can add up over many
    versions; the KL bound is absolute (against the original), so it caps the total drift.
    Non-finite numbers always fail (a diverged model must never be served).
    """
    numbers = (
        candidate.reward,
        candidate.perplexity,
        active.reward,
        active.perplexity,
        *candidate.prompt_rewards,
        *active.prompt_rewards,
    )
    if not all(math.isfinite(x) for x in numbers):
        return GateDecision(
            False,
            (
                f"non-finite evaluation: candidate reward {candidate.reward}, perplexity "
                f"{candidate.perplexity}; active reward {active.reward}, perplexity "
                f"{active.perplexity} (or a non-finite per-prompt reward)",
            ),
        )
    test = paired_reward_test(candidate, active, margin=reward_tolerance, confidence=confidence)
    reasons = []
    if not test.passed:
        reasons.append(
            f"reward not shown non-inferior: candidate - active = {test.estimate:+.4f} over "
            f"{test.n} prompts, {confidence:.0%} lower bound {test.bound:+.4f} < -margin "
            f"{reward_tolerance:g}"
        )
    ceiling = active.perplexity * (1.0 + max_perplexity_rise)
    if candidate.perplexity > ceiling:
        reasons.append(
            f"perplexity {candidate.perplexity:.2f} exceeds the active version's "
            f"{active.perplexity:.2f} x (1 + {max_perplexity_rise:g})"
        )
    if max_kl is not None and not candidate.kl <= max_kl:  # NaN fails too
        reasons.append(f"KL to the original {candidate.kl:.4f} exceeds the bound {max_kl:g}")
    return GateDecision(not reasons, tuple(reasons), test)


def judged_quantile(objective: str) -> int | None:
    """Which output the gate judges a candidate of ``objective`` on: Quark's is the top
    reward token (quantile 0); ACFT's is the default output, with no reward token (None).
    Both versions of a comparison are evaluated on it, so the paired test is unchanged."""
    if objective == "quark":
        return 0
    if objective == "acft":
        return None
    raise ValueError(f"objective={objective!r} is unknown; use quark or acft")


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 <= p < 1) of Student's t with ``df`` >= 1 degrees of freedom.

    Exact for df <= 300: bisection on the closed-form CDF for integer df (Abramowitz &
    Stegun 26.7.3-4); above that, the expansion around the normal quantile (A&S 26.7.5),
    whose error there is below 1e-7 for p <= 0.999.
    """
    if not 0.5 <= p < 1:
        raise ValueError(f"p={p} must be in [0.5, 1)")
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if p == 0.5:
        return 0.0
    if df > _EXACT_T_DF:
        z = NormalDist().inv_cdf(p)
        g1 = (z**3 + z) / 4
        g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
        g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
        g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
        return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
    target = 2 * p - 1  # P(|T| <= t)
    low, high = 0.0, math.pi / 2  # theta = atan(t / sqrt(df))
    for _ in range(100):
        mid = (low + high) / 2
        if _t_central(mid, df) < target:
            low = mid
        else:
            high = mid
    return math.sqrt(df) * math.tan((low + high) / 2)


def _t_central(theta: float, df: int) -> float:
    """P(|T| <= sqrt(df) tan(theta)) for Student's t with integer ``df`` (A&S 26.7.3-4)."""
    sin, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...
            term *= cos2 * (2 * j - 1) / (2 * j)
            total += term
        return sin * total
    if df == 1:
        return 2 * theta / math.pi
    term = math.cos(theta)
    total = term
    for j in range(1, (df - 1) // 2):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ...
        term *= cos2 * (2 * j) / (2 * j + 1)
        total += term
    return 2 / math.pi * (theta + sin * total)


def is_held_out(prompt: str, fraction: float, salt: str = HELD_OUT_SALT) -> bool:
    """A stable pseudo-random split by prompt text: the same prompt is always on one side,
    so held-out prompts never leak into training, in this job or any later one."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{salt}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:_SPLIT_BYTES], "big") / 2 ** (8 * _SPLIT_BYTES) < fraction
