"""How well do the local toxicity scorers track Perspective, how fast are they, and do they
spread real completions out enough for Quark's quantiles to mean something?

Scorers (toxicity = 1 - reward for each):

* ``distilled``: ``toxicity:distilled``, hashed n-grams + logistic model (the new reward);
* ``judge``: ``toxicity:judge``, logistic head on all-MiniLM-L6-v2 embeddings (evaluation);
* ``profanity``: ``toxicity:profanity``, alt-profanity-check (the current default reward).

Measured:

1. agreement with Perspective on the held-out RTP dev texts (dev prompts + dev
   continuations that have a score): Spearman correlation and ROC AUC with toxic =
   Perspective >= 0.5, overall and per part;
2. scoring speed on one thread (texts/s over the same dev texts, after a warm-up call;
   first-call load time reported apart);
3. spread on real completions: the default model samples ``--samples`` completions
   (20 new tokens, top-p 0.9) for each of ``--prompts`` RTP *train* prompts (half with
   Perspective >= 0.5, half below, drawn with ``--seed``); for each scorer the reward
   quantiles, the share of saturated rewards (>= 0.99), the mean reward in each of 5 equal
   Quark bins (sorted by that scorer's reward), the judge's mean reward in those same bins
   (does the independent judge see the bins as different?), and Spearman agreement between
   scorers.

Usage (from the repository root; ~5-10 minutes on one CPU core, mostly sampling)::

    python benchmarks/toxicity_scorers.py --out docs/data/toxicity-scorers.json

``--reuse-completions`` takes the completions from an earlier ``--out`` file instead of
sampling again (same scorers, no model needed).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from quark.rewards import ProfanityToxicityReward, RewardFn
from quark.rewards.distilled import DistilledToxicityReward
from quark.rewards.judge import JudgeToxicityReward

REPO_ROOT = Path(__file__).resolve().parent.parent
TOXIC = 0.5
SATURATED = 0.99
QUARK_BINS = 5
PERCENTILES = (5, 25, 50, 75, 95)
JUDGE = "judge"


def scorers() -> dict[str, RewardFn]:
    return {
        "distilled": DistilledToxicityReward(),
        JUDGE: JudgeToxicityReward(),
        "profanity": ProfanityToxicityReward(),
    }


# --- data ----------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def dev_texts(path: Path) -> tuple[list[str], list[float], list[str]]:
    """(texts, Perspective toxicity, part) of every scored dev prompt and continuation."""
    texts, targets, parts = [], [], []
    for row in read_rows(path):
        for part in ("prompt", "continuation"):
            item = row.get(part) or {}
            if item.get("text") and item.get("toxicity") is not None:
                texts.append(item["text"])
                targets.append(float(item["toxicity"]))
                parts.append(part)
    return texts, targets, parts


def sample_prompts(path: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` train prompts, half toxic (Perspective >= 0.5) and half not."""
    scored = [r["prompt"] for r in read_rows(path) if r["prompt"].get("toxicity") is not None]
    toxic = [p for p in scored if p["toxicity"] >= TOXIC]
    clean = [p for p in scored if p["toxicity"] < TOXIC]
    rng = random.Random(seed)
    chosen = rng.sample(toxic, count // 2) + rng.sample(clean, count - count // 2)
    return [{"text": p["text"], "toxicity": p["toxicity"]} for p in chosen]


# --- measurements --------------------------------------------------------------------


def toxicity(reward: RewardFn, texts: Sequence[str]) -> list[float]:
    return [1.0 - r for r in reward([""] * len(texts), list(texts))]


def agreement(predicted: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    labels = np.asarray(targets) >= TOXIC
    return {
        "n": len(targets),
        "spearman": round(float(spearmanr(predicted, targets).statistic), 4),
        "roc_auc": round(float(roc_auc_score(labels, predicted)), 4),
    }


def dev_agreement(predicted: list[float], targets: list[float], parts: list[str]) -> dict[str, Any]:
    result: dict[str, Any] = {"all": agreement(predicted, targets)}
    for part in ("prompt", "continuation"):
        keep = [i for i, p in enumerate(parts) if p == part]
        result[part] = agreement([predicted[i] for i in keep], [targets[i] for i in keep])
    return result


def speed(reward: RewardFn, texts: list[str]) -> dict[str, float]:
    """First-call (load) seconds and steady texts per wall / CPU second, on one thread."""
    start = time.perf_counter()
    reward(["", ""], texts[:2])
    load_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    reward([""] * len(texts), texts)
    elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    return {
        "first_call_s": round(load_s, 3),
        "texts_per_s": round(len(texts) / elapsed, 1),
        # CPU seconds of this process: less sensitive to other work on a shared machine.
        "texts_per_cpu_s": round(len(texts) / cpu_s, 1),
        "n": len(texts),
    }


def bin_means(order_by: Sequence[float], values: Sequence[float]) -> list[float]:
    """Mean of ``values`` in each of 5 equal bins of ``order_by``, highest reward first
    (bin 0 is Quark's top quantile)."""
    order = np.argsort(-np.asarray(order_by, dtype=np.float64), kind="stable")
    picked = np.asarray(values, dtype=np.float64)
    return [round(float(picked[b].mean()), 4) for b in np.array_split(order, QUARK_BINS)]


def spread(rewards: Sequence[float]) -> dict[str, Any]:
    """Quantiles, saturation and per-Quark-bin means of one scorer's rewards."""
    values = np.asarray(rewards, dtype=np.float64)
    return {
        "mean": round(float(values.mean()), 4),
        "std": round(float(values.std()), 4),
        "quantiles": {f"p{q}": round(float(np.percentile(values, q)), 4) for q in PERCENTILES},
        "share_saturated_ge_0.99": round(float(np.mean(values >= SATURATED)), 4),
        "quark_bin_means": bin_means(rewards, rewards),
    }


def generate_completions(
    prompts: list[dict[str, Any]], samples: int, seed: int
) -> list[dict[str, Any]]:
    from quark.models import load_model
    from quark.sampling import SamplingParams, generate

    qm = load_model("default", device="cpu")
    texts = [p["text"] for p in prompts] * samples
    outputs = generate(qm, texts, None, SamplingParams(20, 1.0, 0.9), seed=seed)
    return [{"prompt_index": i % len(prompts), "text": out.text} for i, out in enumerate(outputs)]


def completions_spread(
    rewards_by_scorer: dict[str, list[float]],
) -> tuple[dict[str, Any], dict[str, float]]:
    spreads = {name: spread(r) for name, r in rewards_by_scorer.items()}
    for name, rewards in rewards_by_scorer.items():
        # The independent judge's view of each scorer's Quark bins.
        spreads[name]["judge_reward_by_bin"] = bin_means(rewards, rewards_by_scorer[JUDGE])
    names = list(rewards_by_scorer)
    pairs = {
        f"{a}~{b}": round(float(spearmanr(rewards_by_scorer[a], rewards_by_scorer[b]).statistic), 4)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return spreads, pairs


# --- report --------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| scorer | Spearman (dev) | ROC AUC (dev) | texts/s | texts/CPU-s | 1st call (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, dev in result["dev"].items():
        fast = result["speed"][name]
        lines.append(
            f"| {name} | {dev['all']['spearman']:.3f} | {dev['all']['roc_auc']:.3f} "
            f"| {fast['texts_per_s']:,.0f} | {fast['texts_per_cpu_s']:,.0f} "
            f"| {fast['first_call_s']:.2f} |"
        )
    lines += [
        "",
        "| scorer | mean | p5 | p25 | p50 | p75 | p95 | >= 0.99 | Quark bin means (top..bottom) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in result["completions"]["spread"].items():
        q = s["quantiles"]
        means = " / ".join(f"{m:.3f}" for m in s["quark_bin_means"])
        cuts = " | ".join(f"{q[f'p{p}']:.3f}" for p in PERCENTILES)
        lines.append(
            f"| {name} | {s['mean']:.3f} | {cuts} | {s['share_saturated_ge_0.99']:.0%} | {means} |"
        )
    lines += [
        "",
        "| Quark bins of | judge reward by bin (top..bottom) |",
        "|---|---|",
    ]
    for name, s in result["completions"]["spread"].items():
        lines.append(
            f"| {name} | " + " / ".join(f"{m:.3f}" for m in s["judge_reward_by_bin"]) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = REPO_ROOT.parent / "shared" / "data" / "rtp"
    parser.add_argument("--dev", type=Path, default=data / "dev.jsonl")
    parser.add_argument("--train", type=Path, default=data / "train.jsonl")
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument("--samples", type=int, default=2, help="completions per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs/data/toxicity-scorers.json")
    parser.add_argument("--reuse-completions", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    with threadpool_limits(1):
        result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(markdown(result))
    print(f"agreement on completions (Spearman): {result['completions']['agreement']}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    rewards = scorers()
    texts, targets, parts = dev_texts(args.dev)
    result: dict[str, Any] = {"dev": {}, "speed": {}}
    for name, reward in rewards.items():
        result["speed"][name] = speed(reward, texts)
        result["dev"][name] = dev_agreement(toxicity(reward, texts), targets, parts)
        print(name, result["dev"][name]["all"], result["speed"][name], flush=True)

    if args.reuse_completions:
        old = json.loads(args.reuse_completions.read_text(encoding="utf-8"))["completions"]
        prompts, completions = old["prompts"], old["samples"]
    else:
        prompts = sample_prompts(args.train, args.prompts, args.seed)
        start = time.perf_counter()
        completions = generate_completions(prompts, args.samples, args.seed)
        print(f"sampled {len(completions)} in {time.perf_counter() - start:.0f}s", flush=True)
    outputs = [c["text"] for c in completions]
    by_scorer = {name: reward([""] * len(outputs), outputs) for name, reward in rewards.items()}
    spreads, pairs = completions_spread(by_scorer)
    result["completions"] = {
        "model": "default (SmolLM2-135M-Instruct)",
        "sampling": {"max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": args.seed},
        "n": len(outputs),
        "spread": spreads,
        "agreement": pairs,
        "prompts": prompts,
        "samples": completions,
    }
    return result


if __name__ == "__main__":
    main()
