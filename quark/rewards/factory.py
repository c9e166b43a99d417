"""Build a reward function from a short spec string (CLI / service settings)."""

from __future__ import annotations

import os
from typing import Any

from quark.rewards.base import RewardFn
from quark.rewards.classifier import ClassifierReward
from quark.rewards.distilled import DistilledToxicityReward
from quark.rewards.judge import JudgeToxicityReward
from quark.rewards.lexical import ProfanityToxicityReward, VaderSentimentReward
from quark.rewards.perspective import PERSPECTIVE_URL, PerspectiveToxicityReward
from quark.rewards.text import KeywordShareReward, RepetitionReward

PERSPECTIVE_KEY_ENV = "QUARK_PERSPECTIVE_API_KEY"

#: The reward each built-in Quark task uses when none is configured.
TASK_DEFAULT_REWARD: dict[str, str] = {
    # Distilled from Perspective: its scores spread over the quantiles where profanity-check's
    # saturate near 1 (docs/toxicity-scorer.md); evaluation judges with toxicity:judge.
    "toxicity": "toxicity:distilled",
    "sentiment": "sentiment:vader",
    "repetition": "repetition",
}

VALID_SPECS = (
    "toxicity | toxicity:profanity",
    "toxicity:hf:/path/to/classifier",
    "toxicity:perspective",
    "toxicity:distilled",
    "toxicity:judge",
    "sentiment | sentiment:vader",
    "sentiment:hf:/path/to/classifier",
    "repetition",
    "keyword:WORD",
)


def build_reward(spec: str, **options: Any) -> RewardFn:
    """Reward for ``spec`` (see :data:`VALID_SPECS`).

    Options irrelevant to the chosen spec are ignored, so callers can pass one
    settings dict for every spec. Recognised options: ``label``, ``device``,
    ``batch_size``, ``max_length`` (hf); ``perspective_api_key``,
    ``perspective_url``, ``requests_per_second``, ``timeout_s``, ``max_retries``,
    ``backoff_s`` (perspective); ``ns`` (repetition); ``device``, ``batch_size`` (judge).
    """
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind == "keyword" and rest:
        return KeywordShareReward(rest)
    if kind == "repetition" and not rest:
        return RepetitionReward(**_pick(options, "ns"))
    if kind in ("toxicity", "sentiment"):
        reward = _build_scored(kind, rest, options)
        if reward is not None:
            return reward
    raise ValueError(f"unknown reward spec {spec!r}; valid forms: {', '.join(VALID_SPECS)}")


def _build_scored(task: str, rest: str, options: dict[str, Any]) -> RewardFn | None:
    backend, _, path = rest.partition(":")
    backend = backend.lower()
    if backend == "hf" and path:
        default_label = "toxic" if task == "toxicity" else "positive"
        return ClassifierReward(
            path,
            label=options.get("label", default_label),
            invert=task == "toxicity",
            **_pick(options, "device", "batch_size", "max_length"),
        )
    if path:
        return None
    if task == "toxicity" and backend in ("", "profanity"):
        return ProfanityToxicityReward()
    if task == "toxicity" and backend == "perspective":
        return _build_perspective(options)
    if task == "toxicity" and backend == "distilled":
        return DistilledToxicityReward()
    if task == "toxicity" and backend == "judge":
        return JudgeToxicityReward(**_pick(options, "device", "batch_size"))
    if task == "sentiment" and backend in ("", "vader"):
        return VaderSentimentReward()
    return None


def _build_perspective(options: dict[str, Any]) -> PerspectiveToxicityReward:
    api_key = options.get("perspective_api_key") or os.environ.get(PERSPECTIVE_KEY_ENV)
    if not api_key:
        raise ValueError(
            "toxicity:perspective needs an API key: pass perspective_api_key "
            f"or set {PERSPECTIVE_KEY_ENV}"
        )
    return PerspectiveToxicityReward(
        api_key,
        url=options.get("perspective_url") or PERSPECTIVE_URL,
        **_pick(options, "requests_per_second", "timeout_s", "max_retries", "backoff_s"),
    )


def _pick(options: dict[str, Any], *names: str) -> dict[str, Any]:
    """The subset of ``options`` named in ``names`` whose value is not None."""
    return {n: options[n] for n in names if options.get(n) is not None}
