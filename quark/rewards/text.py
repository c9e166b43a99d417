"""Rewards and metrics computed from the completion text alone."""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Sequence

from quark.rewards.base import CompletionReward


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous ``n``-grams of ``tokens`` (empty when too short)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n: unique / total ``n``-grams over whitespace tokens of ``texts``.

    N-grams never span two texts. Returns 0.0 when there are no n-grams.
    """
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(tokens: Sequence[str], n: int) -> float:
    """rep-n = 1 - unique/total ``n``-grams within one sequence (0.0 when none)."""
    grams = ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def diversity(tokens: Sequence[str], ns: Iterable[int] = (2, 3, 4)) -> float:
    """Diversity = prod_n (1 - rep-n), as in the unlikelihood-training/Quark papers."""
    return math.prod(1.0 - repeated_ngram_rate(tokens, n) for n in ns)


class RepetitionReward(CompletionReward):
    """Anti-degeneration reward: :func:`diversity` of the completion's whitespace tokens.

    A completion too short to contain any n-gram has no repetition, so scores 1.0.
    """

    def __init__(self, ns: Sequence[int] = (2, 3, 4)) -> None:
        if not ns or any(n < 1 for n in ns):
            raise ValueError(f"ns must be a non-empty sequence of ints >= 1, got {ns!r}")
        self.ns = tuple(ns)

    def score(self, completions: list[str]) -> list[float]:
        return [diversity(text.split(), self.ns) for text in completions]


def _normalise_word(word: str) -> str:
    return word.strip(string.punctuation).casefold()


class KeywordShareReward(CompletionReward):
    """Synthetic reward: share of the completion's words equal to ``keyword``.

    Words are whitespace-separated, case-insensitive, with surrounding punctuation
    stripped; pure-punctuation tokens are not words. Empty completion -> 0.0.
    Easy to learn, so tests and demos can show Quark moving the policy quickly.
    """

    def __init__(self, keyword: str) -> None:
        self.keyword = _normalise_word(keyword)
        if not self.keyword or any(c.isspace() for c in self.keyword):
            raise ValueError(f"keyword must be a single non-empty word, got {keyword!r}")

    def score(self, completions: list[str]) -> list[float]:
        return [self._share(text) for text in completions]

    def _share(self, text: str) -> float:
        words = [w for w in map(_normalise_word, text.split()) if w]
        return sum(w == self.keyword for w in words) / len(words) if words else 0.0
