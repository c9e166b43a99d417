"""ACFT's fine-tuning corpus: completions the oracle accepts, optionally mixed with a plain
utility text so that fluency holds (docs/acft.md, "The corpus")."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from quark.acft.training import Example
from quark.data import read_passages
from quark.pool import PoolRecord

#: A utility passage becomes (its first words -> the rest): the prompt gives the context.
UTILITY_PROMPT_WORDS = 8


def accepted_examples(records: Sequence[PoolRecord], threshold: float) -> list[Example]:
    """(prompt -> completion) of the scored records whose reward is >= ``threshold``: the
    completions that satisfy the constraint C (unscored records are skipped)."""
    return [
        Example(r.prompt, r.completion)
        for r in records
        if r.reward is not None and r.reward >= threshold and r.completion.strip()
    ]


def utility_examples(path: Path, count: int, rng: random.Random) -> list[Example]:
    """Up to ``count`` passages of a plain-text file (``quark.data.read_passages``), each split
    into its first ``UTILITY_PROMPT_WORDS`` words (the prompt) and the rest (the completion)."""
    if count <= 0:
        return []
    passages = [p.split() for p in read_passages(path)]
    chosen = rng.sample(passages, min(count, len(passages)))
    return [
        Example(" ".join(w[:UTILITY_PROMPT_WORDS]), " " + " ".join(w[UTILITY_PROMPT_WORDS:]))
        for w in chosen
    ]


def mix_corpus(
    accepted: Sequence[Example],
    utility_text: Path | None,
    fraction: float,
    rng: random.Random,
) -> list[Example]:
    """The accepted examples plus utility passages making up ``fraction`` of the result
    (fewer if the file has fewer usable passages); only the accepted ones without a file."""
    if utility_text is None or fraction <= 0 or not accepted:
        return list(accepted)
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction={fraction} must be in [0, 1)")
    wanted = round(len(accepted) * fraction / (1 - fraction))
    return list(accepted) + utility_examples(utility_text, wanted, rng)
