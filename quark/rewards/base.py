"""Shared types and helpers for reward functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: A reward function scores each (prompt, completion) pair; higher is better.
RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]


class RewardError(RuntimeError):
    """A reward backend failed (e.g. a remote scoring API kept erroring)."""


def check_lengths(prompts: Sequence[str], completions: Sequence[str]) -> None:
    """Raise ValueError unless there is exactly one completion per prompt."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(completions)} completions; "
            "reward functions need one completion per prompt"
        )


class CompletionReward:
    """Base for rewards that look only at the completion text.

    Subclasses implement :meth:`score`; ``__call__`` validates the pairing.
    """

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_lengths(prompts, completions)
        if not completions:
            return []
        return self.score(list(completions))

    def score(self, completions: list[str]) -> list[float]:
        """Score non-empty batch of completions (same order, one float each)."""
        raise NotImplementedError
