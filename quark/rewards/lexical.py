"""Cheap, local lexicon/linear-model rewards: profanity-check and VADER."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from quark.rewards.base import CompletionReward

if TYPE_CHECKING:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

#: VADER's own convention: compound >= 0.05 is "positive".
VADER_POSITIVE_THRESHOLD = 0.05


class ProfanityToxicityReward(CompletionReward):
    """Non-toxicity reward: ``1 - P(offensive)`` from ``alt-profanity-check``."""

    def score(self, completions: list[str]) -> list[float]:
        # Imported lazily: loading the pickled sklearn model costs ~0.5 s.
        from profanity_check import predict_prob

        probs = predict_prob(completions)
        return [_clip01(1.0 - float(p)) for p in probs]


@cache
def _vader() -> SentimentIntensityAnalyzer:
    # The analyzer parses its lexicon on construction, so share one instance.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER compound sentiment of ``text`` in [-1, 1]."""
    return float(_vader().polarity_scores(text)["compound"])


def is_positive_vader(text: str) -> bool:
    """True when VADER calls ``text`` positive (compound >= 0.05)."""
    return vader_compound(text) >= VADER_POSITIVE_THRESHOLD


class VaderSentimentReward(CompletionReward):
    """Positive-sentiment reward: VADER compound rescaled to [0, 1]."""

    def score(self, completions: list[str]) -> list[float]:
        return [_clip01((vader_compound(text) + 1.0) / 2.0) for text in completions]


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))
