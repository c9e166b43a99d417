"""Pairing two ``quark eval`` runs on the same prompts and seeds: every metric of both, the
difference B - A and the relative change (B - A) / A, each with a paired bootstrap interval
over prompts (``quark compare``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from quark.evaluation import PAIRING_KEYS, metric_samples
from quark.intervals import (
    RESAMPLES,
    Interval,
    bootstrap_ci,
    paired_difference,
    relative_change,
)


class Comparison(NamedTuple):
    """One metric of two paired runs: each run's value, B - A and (B - A) / A."""

    metric: str
    a: Interval
    b: Interval
    difference: Interval
    relative: Interval


def check_pairable(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """ValueError unless two :func:`evaluate` results sampled the same prompts the same way."""
    for key in PAIRING_KEYS:
        if key not in a or key not in b:
            raise ValueError(
                f"cannot pair these runs: {key!r} is missing from "
                f"{'A' if key not in a else 'B'} (written by an older quark eval?)"
            )
    if a["prompt_sha256"] != b["prompt_sha256"]:
        hashes_a, hashes_b = a["prompt_sha256"], b["prompt_sha256"]
        if len(hashes_a) != len(hashes_b):
            detail = f"{len(hashes_a)} vs {len(hashes_b)} prompts"
        else:
            first = next(
                i for i, (x, y) in enumerate(zip(hashes_a, hashes_b, strict=True)) if x != y
            )
            detail = f"they first differ at prompt {first}"
        raise ValueError(f"cannot pair these runs: different prompts ({detail})")
    differ = [f"{k} {a[k]!r} vs {b[k]!r}" for k in PAIRING_KEYS[1:] if a[k] != b[k]]
    if differ:
        raise ValueError(f"cannot pair these runs: {', '.join(differ)}")


def compare_runs(
    a: Mapping[str, Any], b: Mapping[str, Any], resamples: int = RESAMPLES, seed: int = 0
) -> list[Comparison]:
    """Paired comparison of every metric present in both runs (ValueError if not pairable).

    The same bootstrap draws of prompts serve every interval of a metric.
    """
    check_pairable(a, b)
    samples_a, samples_b = metric_samples(a), metric_samples(b)
    rows = []
    for metric, (values_a, stat) in samples_a.items():
        if metric not in samples_b:
            continue
        values_b = samples_b[metric][0]
        rows.append(
            Comparison(
                metric,
                bootstrap_ci(values_a, stat, resamples, seed=seed),
                bootstrap_ci(values_b, stat, resamples, seed=seed),
                paired_difference(values_a, values_b, stat, resamples, seed=seed),
                relative_change(values_a, values_b, stat, resamples, seed=seed),
            )
        )
    return rows
