"""The promotion gate's paired non-inferiority test, on hand-built evaluations."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from quark.online.gate import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MARGIN,
    paired_reward_test,
    promotion_gate,
    t_quantile,
)
from quark.online.params import UnlearnParams
from quark.service.settings import ServiceSettings
from quark.version_eval import EvalResult


def _result(rewards: list[float], *, ppl: float = 10.0, kl: float = 0.1) -> EvalResult:
    return EvalResult(
        reward=sum(rewards) / len(rewards),
        perplexity=ppl,
        kl=kl,
        prompts=len(rewards),
        samples=2,
        prompt_rewards=tuple(rewards),
    )


def _active(n: int, seed: int = 0) -> list[float]:
    """Per-prompt rewards like the profanity reward's: mostly high, a few low prompts."""
    rng = random.Random(seed)
    return [min(1.0, max(0.0, rng.betavariate(4.0, 0.4))) for _ in range(n)]


def _shifted(rewards: list[float], shift: float, noise: float, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [r + shift + rng.gauss(0.0, noise) for r in rewards]


def test_identical_per_prompt_rewards_pass_with_the_estimate_as_bound() -> None:
    active = _active(64)
    decision = promotion_gate(_result(active), _result(active))
    assert decision.passed and decision.reasons == ()
    test = decision.reward_test
    assert test is not None
    assert test.estimate == 0.0 and test.stderr == 0.0 and test.bound == 0.0 and test.n == 64


def test_a_candidate_uniformly_worse_by_more_than_the_margin_is_refused() -> None:
    active = _active(64)
    worse = _shifted(active, -0.05, 0.01)
    decision = promotion_gate(_result(worse), _result(active))
    assert not decision.passed
    assert len(decision.reasons) == 1 and "non-inferior" in decision.reasons[0]
    assert decision.reward_test is not None and decision.reward_test.bound < -DEFAULT_MARGIN


def test_a_better_candidate_passes() -> None:
    active = _active(64)
    decision = promotion_gate(_result(_shifted(active, 0.03, 0.05)), _result(active))
    assert decision.passed
    assert decision.reward_test is not None and decision.reward_test.estimate > 0


def test_a_noisy_equal_candidate_passes_with_enough_prompts_only() -> None:
    # Same true reward, per-prompt noise sd 0.1: with 512 prompts the bound is about
    # -1.65 * 0.1 / sqrt(512) = -0.007, well inside the margin; with 8 it is about -0.06.
    active = _active(512)
    equal = _shifted(active, 0.0, 0.1)
    large = promotion_gate(_result(equal), _result(active))
    assert large.passed, large.reasons
    assert large.reward_test is not None and -DEFAULT_MARGIN < large.reward_test.bound < 0
    small = promotion_gate(_result(equal[:8]), _result(active[:8]))
    assert not small.passed  # no evidence either way: not shown non-inferior


@pytest.mark.parametrize(
    ("candidate", "active"),
    [
        (_result([0.9, math.nan, 0.8]), _result([0.9, 0.9, 0.8])),
        (_result([0.9, 0.9, 0.8]), _result([0.9, 0.9, math.inf])),
        (_result([0.9, 0.9, 0.8], ppl=math.nan), _result([0.9, 0.9, 0.8])),
        (_result([0.9, 0.9, 0.8]), _result([0.9, 0.9, 0.8], ppl=math.inf)),
    ],
)
def test_non_finite_numbers_always_fail(candidate: EvalResult, active: EvalResult) -> None:
    decision = promotion_gate(candidate, active, reward_tolerance=1.0, max_kl=None)
    assert not decision.passed and "non-finite" in decision.reasons[0]
    assert decision.reward_test is None


def test_a_non_finite_kl_fails() -> None:
    active = _active(8)
    decision = promotion_gate(_result(active, kl=math.nan), _result(active))
    assert not decision.passed and "KL" in decision.reasons[0]


def test_the_decision_records_estimate_bound_n_and_confidence() -> None:
    active = _active(40)
    candidate = _shifted(active, 0.01, 0.05)
    decision = promotion_gate(
        _result(candidate), _result(active), reward_tolerance=0.03, confidence=0.9
    )
    diffs = [c - a for c, a in zip(candidate, active, strict=True)]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    recorded = json.loads(json.dumps(decision.as_dict(), allow_nan=False))
    test = recorded["reward_test"]
    assert test["n"] == 40 and test["confidence"] == 0.9 and test["margin"] == 0.03
    assert test["estimate"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert test["stderr"] == pytest.approx(stderr, rel=1e-9)
    assert test["bound"] == pytest.approx(
        statistics.fmean(diffs) - t_quantile(0.9, 39) * stderr, rel=1e-9
    )
    assert test["passed"] is recorded["passed"] is True


def test_mismatched_prompt_counts_raise() -> None:
    with pytest.raises(ValueError, match="same prompts"):
        promotion_gate(_result(_active(10)), _result(_active(12)))
    with pytest.raises(ValueError, match="per-prompt rewards"):
        paired_reward_test(
            EvalResult(reward=0.9, perplexity=10.0, kl=0.1, prompts=3, samples=2),
            _result([0.9, 0.9, 0.9]),
        )
    with pytest.raises(ValueError, match="per-prompt rewards for"):
        EvalResult(reward=0.9, perplexity=10.0, kl=0.1, prompts=3, samples=2, prompt_rewards=(1,))


def test_a_single_prompt_gives_no_bound_and_is_refused() -> None:
    decision = promotion_gate(_result([1.0]), _result([0.5]), reward_tolerance=1.0)
    assert not decision.passed and decision.reward_test is not None
    assert decision.reward_test.bound == -math.inf
    recorded = json.loads(json.dumps(decision.as_dict(), allow_nan=False))
    assert recorded["reward_test"]["bound"] is None and recorded["reward_test"]["n"] == 1


def test_confidence_one_half_without_margin_is_the_mean_comparison() -> None:
    rng = random.Random(3)
    for _ in range(200):
        active = _active(16, seed=rng.randrange(10**6))
        candidate = _shifted(active, rng.uniform(-0.05, 0.05), 0.1, seed=rng.randrange(10**6))
        decision = promotion_gate(
            _result(candidate), _result(active), reward_tolerance=0.0, confidence=0.5
        )
        old_rule = statistics.fmean(candidate) >= statistics.fmean(active)
        assert decision.passed is old_rule


def test_a_higher_confidence_gives_a_lower_bound() -> None:
    active = _active(30)
    candidate = _result(_shifted(active, 0.0, 0.05))
    bounds = [
        paired_reward_test(candidate, _result(active), confidence=c).bound
        for c in (0.5, 0.8, 0.95, 0.99)
    ]
    assert bounds == sorted(bounds, reverse=True)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [  # printed t tables (4 decimals)
        (0.95, 1, 6.3138),
        (0.95, 2, 2.9200),
        (0.95, 10, 1.8125),
        (0.975, 30, 2.0423),
        (0.99, 5, 3.3649),
        (0.95, 63, 1.6694),
        (0.95, 120, 1.6577),
        (0.95, 1000, 1.6464),
        (0.5, 7, 0.0),
    ],
)
def test_t_quantile_matches_the_tables(p: float, df: int, expected: float) -> None:
    assert t_quantile(p, df) == pytest.approx(expected, abs=6e-5)


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for p in (0.6, 0.9, 0.95, 0.975, 0.999):
        for df in (*range(1, 41), 63, 127, 255, 300, 301, 511, 2000, 10**6):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-7)


def test_t_quantile_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        t_quantile(0.4, 5)
    with pytest.raises(ValueError):
        t_quantile(0.95, 0)


def test_eval_result_round_trips_through_json() -> None:
    result = _result([0.25, 0.5, 1.0])
    assert EvalResult(**json.loads(json.dumps(result.as_dict()))) == result
    old = {"reward": 0.9, "perplexity": 10.0, "kl": 0.1, "prompts": 3, "samples": 2}
    assert EvalResult(**old).prompt_rewards == ()  # saved before per-prompt rewards existed


def test_gate_params_defaults_bounds_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    params = UnlearnParams()
    assert params.gate_confidence == DEFAULT_CONFIDENCE == 0.95
    assert params.reward_tolerance == DEFAULT_MARGIN == 0.02
    assert (params.eval_prompts, params.eval_samples) == (64, 4)
    for bad in (0.4, 1.0):
        with pytest.raises(ValueError, match="gate_confidence"):
            UnlearnParams(gate_confidence=bad)
    monkeypatch.setenv("QUARK_GATE_CONFIDENCE", "0.9")
    settings = ServiceSettings()
    assert settings.unlearn_params({}).gate_confidence == 0.9
    assert settings.unlearn_params({"gate_confidence": 0.99}).gate_confidence == 0.99
