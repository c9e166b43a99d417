"""Reward functions for Quark: ``(prompts, completions) -> list[float]``, higher is better.

Build one from a spec string with :func:`build_reward`, e.g. ``"toxicity"``,
``"sentiment:hf:/models/sst2"`` or ``"keyword:banana"``.
"""

from quark.rewards.base import CompletionReward, RewardError, RewardFn, check_lengths
from quark.rewards.classifier import ClassifierReward
from quark.rewards.distilled import DistilledToxicityReward
from quark.rewards.factory import (
    PERSPECTIVE_KEY_ENV,
    TASK_DEFAULT_REWARD,
    VALID_SPECS,
    build_reward,
)
from quark.rewards.judge import JudgeToxicityReward
from quark.rewards.lexical import (
    ProfanityToxicityReward,
    VaderSentimentReward,
    is_positive_vader,
    vader_compound,
)
from quark.rewards.perspective import PERSPECTIVE_URL, PerspectiveToxicityReward, RateLimiter
from quark.rewards.text import (
    KeywordShareReward,
    RepetitionReward,
    distinct_n,
    diversity,
    ngrams,
    repeated_ngram_rate,
)

__all__ = [
    "PERSPECTIVE_KEY_ENV",
    "PERSPECTIVE_URL",
    "TASK_DEFAULT_REWARD",
    "VALID_SPECS",
    "ClassifierReward",
    "CompletionReward",
    "DistilledToxicityReward",
    "JudgeToxicityReward",
    "KeywordShareReward",
    "PerspectiveToxicityReward",
    "ProfanityToxicityReward",
    "RateLimiter",
    "RepetitionReward",
    "RewardError",
    "RewardFn",
    "VaderSentimentReward",
    "build_reward",
    "check_lengths",
    "distinct_n",
    "diversity",
    "is_positive_vader",
    "ngrams",
    "repeated_ngram_rate",
    "vader_compound",
]
