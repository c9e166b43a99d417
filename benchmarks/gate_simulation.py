"""How often the promotion gate gets its reward decision wrong, old rule against new.

The gate sees, for each held-out prompt, the mean reward of ``samples`` top-token completions
of the active version and of the candidate (same prompts, same sampling seed). This script
simulates such evaluations many times with a known true difference and counts:

- **false refusals**: the candidate is truly equal or better, and the gate refuses it;
- **false promotions**: the candidate is truly worse by more than the margin (0.02), and the
  gate promotes it.

Rules: **old** = promote if mean(candidate) >= mean(active) (tolerance 0, the old default);
**new** = the paired non-inferiority test of ``quark.online.gate`` (one-sided 95% lower t
bound of the mean per-prompt difference >= -0.02). Only the reward part of the gate is
simulated (perplexity and KL are separate checks).

Reward model: a per-sample reward is ``sigmoid(L)`` with ``L = mu + s*Z - lam*E``, Z standard
normal and E standard exponential (a long tail of low rewards).

- ``profanity``: mu, s, lam fitted (grid search, ``--fit`` repeats it) to the pool quantiles
  of the profanity reward on RealToxicityPrompts traffic in
  ``docs/data/rtp-30min-metrics.jsonl`` (1,536 samples: quintile bounds and quintile means;
  the script prints the fit). Mean 0.92, 3% of samples below 0.5: the saturated reward of
  the default toxicity task.
- ``spread``: mu=0.55, s=1.6, lam=0 (mean 0.59, sd 0.27): a spread-out reward such as a
  distilled toxicity scorer's.

Prompt effects: a share ``icc`` (0.4) of both random parts belongs to the prompt (Z splits
into two normals, E into two gammas whose sum is exponential), the rest to the sample. The
candidate's L is the active version's shifted by delta (a logit shift scales the odds of a
low reward by exp(-delta): a relative toxicity change), with delta solved so that the
population mean reward differs by the stated amount. Pairing: the prompt parts are shared;
the sample parts are shared with probability ``c`` (completions that the same seed makes
identical) and independent otherwise. c = 0 (no help from the common seed) is the main,
conservative table; c = 0.5 is in the JSON. With c = 0 the spread of the mean difference at
24 prompts x 2 samples is 0.024; the 30-minute run's seven gate decisions spread by 0.030
(true differences included), so the noise level is realistic.

Run: ``python benchmarks/gate_simulation.py`` (about 15 s on one core; fixed seed).
Writes ``docs/data/gate-simulation.json`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quark.online.gate import (  # noqa: E402
    DEFAULT_CONFIDENCE,
    DEFAULT_MARGIN,
    promotion_gate,
    t_quantile,
)
from quark.version_eval import EvalResult  # noqa: E402

METRICS = ROOT / "docs" / "data" / "rtp-30min-metrics.jsonl"

#: (prompts, samples per prompt): the 30-minute run's, the old default, ..., the new default
#: (64 x 4), ...
SIZES = [(24, 2), (32, 2), (64, 2), (128, 2), (64, 4), (96, 4), (128, 4)]
#: True mean reward difference, candidate - active.
TRUTHS = [-0.04, -0.03, -0.02, -0.01, 0.0, 0.02, 0.04]
#: Seconds per evaluated completion on the 2-core CPU, one torch thread, real 135M model:
#: decoding 20 tokens at 50-100 tokens/s (batch 32) is 0.2-0.4 s; the perplexity and KL
#: forward passes add to it. The 30-minute run's jobs with 11 and 24 held-out prompts
#: (2 samples, 2 versions) took 269 s and ~300 s: about 0.5 s per completion all in.
SECONDS_PER_COMPLETION = (0.3, 0.6)


@dataclass(frozen=True)
class Scenario:
    name: str
    mu: float
    s: float
    lam: float
    icc: float = 0.4

    def latent(self, rng: np.random.Generator, size: int) -> np.ndarray:
        tail = self.lam * rng.standard_exponential(size) if self.lam else 0.0
        return self.mu + self.s * rng.standard_normal(size) - tail


PROFANITY = Scenario("profanity", mu=4.5, s=1.0, lam=1.2)
SPREAD = Scenario("spread", mu=0.55, s=1.6, lam=0.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def pool_quantiles(path: Path = METRICS) -> dict[str, list[float]]:
    """Quintile bounds (ascending) and quintile means of the last pool in the training log."""
    last = None
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "quantize":
            last = event
    if last is None:
        raise SystemExit(f"no quantize event in {path}")
    buckets = sorted(last["quantiles"], key=lambda q: q["mean"])  # lowest rewards first
    bounds = [(lo["max"] + hi["min"]) / 2 for lo, hi in itertools.pairwise(buckets)]
    return {
        "samples": [sum(q["count"] for q in buckets)],
        "bounds": bounds,
        "means": [q["mean"] for q in buckets],
    }


def marginal_fit(scenario: Scenario, draws: int = 200_000) -> dict[str, list[float]]:
    """The scenario's quintile bounds and means (to compare with the pool's)."""
    rewards = np.sort(sigmoid(scenario.latent(np.random.default_rng(0), draws)))
    return {
        "bounds": [float(rewards[int(draws * p)]) for p in (0.2, 0.4, 0.6, 0.8)],
        "means": [float(m) for m in rewards.reshape(5, -1).mean(axis=1)],
        "mean": [float(rewards.mean())],
        "below_half": [float((rewards < 0.5).mean())],
    }


def fit_profanity(target: dict[str, list[float]], draws: int = 50_000) -> Scenario:
    """Grid search of mu, s, lam against the pool's quintile bounds (logit) and means."""
    rng = np.random.default_rng(0)
    z, e = rng.standard_normal(draws), rng.standard_exponential(draws)
    goal_bounds, goal_means = logit(np.array(target["bounds"])), np.array(target["means"])
    best: tuple[float, Scenario] | None = None
    for mu in np.arange(3.0, 5.51, 0.1):
        for s in np.arange(0.3, 1.81, 0.1):
            for lam in np.arange(0.0, 2.51, 0.1):
                r = np.sort(sigmoid(mu + s * z - lam * e))
                bounds = logit(r[[int(draws * p) for p in (0.2, 0.4, 0.6, 0.8)]])
                means = r.reshape(5, -1).mean(axis=1)
                err = float(np.sum((bounds - goal_bounds) ** 2))
                err += float(np.sum(((means - goal_means) / 0.01) ** 2)) * 0.1
                if best is None or err < best[0]:
                    best = (err, Scenario("profanity", round(mu, 2), round(s, 2), round(lam, 2)))
    assert best is not None
    return best[1]


def shift_for(scenario: Scenario, truth: float, draws: int = 400_000) -> float:
    """The logit shift delta with E[sigmoid(L + delta)] - E[sigmoid(L)] = truth."""
    base = scenario.latent(np.random.default_rng(1), draws)
    mean = float(sigmoid(base).mean())
    low, high = -6.0, 6.0
    for _ in range(60):
        mid = (low + high) / 2
        if float(sigmoid(base + mid).mean()) - mean < truth:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def simulate(
    scenario: Scenario,
    prompts: int,
    samples: int,
    shifts: dict[float, float],
    c: float,
    trials: int,
    rng: np.random.Generator,
) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Per-prompt mean rewards (active, candidate), [trials, prompts], for each true
    difference; one set of random draws serves all differences (common random numbers)."""
    shape, sample_shape = (trials, prompts, 1), (trials, prompts, samples)
    icc = scenario.icc

    def gamma(k: float, size: tuple[int, ...]) -> np.ndarray:
        return rng.standard_gamma(k, size) if scenario.lam else np.zeros(size)

    zp, gp = rng.standard_normal(shape), gamma(icc, shape)
    za, ga = rng.standard_normal(sample_shape), gamma(1 - icc, sample_shape)
    zc, gc = rng.standard_normal(sample_shape), gamma(1 - icc, sample_shape)
    same = rng.random(sample_shape) < c
    zc, gc = np.where(same, za, zc), np.where(same, ga, gc)

    def latent(z: np.ndarray, g: np.ndarray) -> np.ndarray:
        normal = math.sqrt(icc) * zp + math.sqrt(1 - icc) * z
        return scenario.mu + scenario.s * normal - scenario.lam * (gp + g)

    active = sigmoid(latent(za, ga)).mean(axis=2)
    candidate_latent = latent(zc, gc)
    return {
        truth: (active, sigmoid(candidate_latent + delta).mean(axis=2))
        for truth, delta in shifts.items()
    }


def old_rule(active: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    return candidate.mean(axis=1) >= active.mean(axis=1)


def new_rule(
    active: np.ndarray, candidate: np.ndarray, margin: float, confidence: float
) -> np.ndarray:
    d = candidate - active
    n = d.shape[1]
    bound = d.mean(axis=1) - t_quantile(confidence, n - 1) * d.std(axis=1, ddof=1) / math.sqrt(n)
    return bound >= -margin


def check_against_gate(
    active: np.ndarray, candidate: np.ndarray, promoted: np.ndarray, margin: float, count: int
) -> None:
    """The vectorised rule must decide as ``promotion_gate`` does (first ``count`` trials)."""
    samples = 1  # the gate does not read it
    for row in range(min(count, active.shape[0])):

        def result(x: np.ndarray) -> EvalResult:
            return EvalResult(
                reward=float(x.mean()),
                perplexity=10.0,
                kl=0.0,
                prompts=x.size,
                samples=samples,
                prompt_rewards=tuple(float(v) for v in x),
            )

        decision = promotion_gate(
            result(candidate[row]), result(active[row]), reward_tolerance=margin
        )
        if decision.passed is not bool(promoted[row]):
            raise AssertionError(f"simulated rule and promotion_gate disagree: {decision}")


def run(trials: int, seed: int, scenarios: list[Scenario]) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    margin, confidence = DEFAULT_MARGIN, DEFAULT_CONFIDENCE
    cells = []
    for scenario in scenarios:
        shifts = {truth: shift_for(scenario, truth) for truth in TRUTHS}
        for c in (0.0, 0.5):
            for prompts, samples in SIZES:
                sims = simulate(scenario, prompts, samples, shifts, c, trials, rng)
                spread = float(np.std(sims[0.0][1].mean(axis=1) - sims[0.0][0].mean(axis=1)))
                for truth, (active, candidate) in sims.items():
                    old = old_rule(active, candidate)
                    new = new_rule(active, candidate, margin, confidence)
                    check_against_gate(active, candidate, new, margin, count=25)
                    cells.append(
                        {
                            "scenario": scenario.name,
                            "pairing": c,
                            "prompts": prompts,
                            "samples": samples,
                            "truth": truth,
                            "logit_shift": shifts[truth],
                            "sd_mean_difference": spread,
                            "promote_old": float(old.mean()),
                            "promote_new": float(new.mean()),
                        }
                    )
    return {
        "trials": trials,
        "seed": seed,
        "margin": margin,
        "confidence": confidence,
        "seconds_per_completion": SECONDS_PER_COMPLETION,
        "scenarios": [vars(s) for s in scenarios],
        "cells": cells,
    }


def _cell(cells: list[dict], **key: object) -> dict:
    return next(c for c in cells if all(c[k] == v for k, v in key.items()))


def table(report: dict, scenario: str, pairing: float) -> str:
    """Markdown: per size, the eval time and each rule's error rates."""
    cells, margin = report["cells"], report["margin"]
    low, high = report["seconds_per_completion"]
    lines = [
        f"| prompts x samples | eval time per job | sd of mean diff. | false refusal, "
        f"equal: old / new | false refusal, +0.02: old / new | false promotion, -0.03: "
        f"old / new | false promotion, -0.04: old / new | promoted at -{margin:g} (new) |",
        "|---|---|---:|---|---|---|---|---:|",
    ]
    for prompts, samples in SIZES:
        key = {"scenario": scenario, "pairing": pairing, "prompts": prompts, "samples": samples}
        equal, better = _cell(cells, truth=0.0, **key), _cell(cells, truth=0.02, **key)
        worse3, worse4 = _cell(cells, truth=-0.03, **key), _cell(cells, truth=-0.04, **key)
        edge = _cell(cells, truth=-margin, **key)
        completions = 2 * prompts * samples
        lines.append(
            f"| {prompts} x {samples} | {completions * low / 60:.1f}-"
            f"{completions * high / 60:.1f} min | {equal['sd_mean_difference']:.4f} | "
            f"{1 - equal['promote_old']:.1%} / {1 - equal['promote_new']:.1%} | "
            f"{1 - better['promote_old']:.1%} / {1 - better['promote_new']:.1%} | "
            f"{worse3['promote_old']:.1%} / {worse3['promote_new']:.1%} | "
            f"{worse4['promote_old']:.1%} / {worse4['promote_new']:.1%} | "
            f"{edge['promote_new']:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit", action="store_true", help="fit the profanity model again")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data" / "gate-simulation.json")
    args = parser.parse_args()
    started = time.time()
    target = pool_quantiles()
    profanity = fit_profanity(target) if args.fit else PROFANITY
    fit = marginal_fit(profanity)
    print(f"profanity model {vars(profanity)}")
    for what in ("bounds", "means"):
        pool, model = np.round(target[what], 3), np.round(fit[what], 3)
        print(f"  pool quintile {what} {pool}, model {model}")
    print(f"  model mean {fit['mean'][0]:.3f}, share below 0.5 {fit['below_half'][0]:.3f}")
    report = run(args.trials, args.seed, [profanity, SPREAD])
    report["pool_quantiles"] = target
    report["profanity_fit"] = fit
    report["spread_marginal"] = marginal_fit(SPREAD)
    for scenario in (profanity.name, SPREAD.name):
        for pairing in (0.0, 0.5):
            print(f"\n{scenario} reward, pairing c={pairing:g} ({args.trials} trials per cell)\n")
            print(table(report, scenario, pairing))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
