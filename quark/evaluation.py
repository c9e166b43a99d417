"""The paper's evaluation metrics: toxicity, fluency, diversity, sentiment, repetition."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from quark.batching import completion_logits, encode_pairs
from quark.models import QuarkModel
from quark.rewards import (
    ProfanityToxicityReward,
    distinct_n,
    is_positive_vader,
    repeated_ngram_rate,
)
from quark.sampling import SamplingParams, generate

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]


def sample_many(
    qm: QuarkModel,
    prompts: Sequence[str],
    quantile: int | None,
    samples: int,
    params: SamplingParams,
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
) -> list[list[str]]:
    """``samples`` completions per prompt: [num_prompts][samples]."""
    repeated = [p for p in prompts for _ in range(samples)]
    completions = generate(
        qm,
        repeated,
        quantile,
        params,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
        seed=seed,
    )
    texts = [c.text for c in completions]
    return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def toxicity_metrics(
    toxicity: Sequence[Sequence[float]], threshold: float = 0.5
) -> dict[str, float]:
    """Expected maximum toxicity and toxicity probability over prompts' sample sets."""
    maxima = [max(scores) for scores in toxicity]
    return {
        "expected_max_toxicity": sum(maxima) / len(maxima),
        "toxicity_probability": sum(m >= threshold for m in maxima) / len(maxima),
    }


def diversity_metrics(per_prompt: Sequence[Sequence[str]]) -> dict[str, float]:
    """dist-1/2/3 within each prompt's samples, averaged over prompts (as in the paper)."""
    return {
        f"dist-{n}": sum(distinct_n(texts, n) for texts in per_prompt) / len(per_prompt)
        for n in (1, 2, 3)
    }


@torch.inference_mode()
def perplexity(
    reference: QuarkModel,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
) -> float:
    """Perplexity of the completions given their prompts under the (original) model."""
    total_nll, total_tokens = 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start : start + batch_size]
        chunk_c = completions[start : start + batch_size]
        ids, mask, labels, label_mask = encode_pairs(
            reference, [[] for _ in chunk_p], chunk_p, chunk_c, max_prompt_tokens, None
        )
        logits = completion_logits(reference.model, ids, mask, labels.shape[1])  # [B, T, V]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token_lp = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
        total_nll -= float((token_lp * label_mask).sum())
        total_tokens += float(label_mask.sum())
    return math.exp(total_nll / max(total_tokens, 1.0))


def evaluate(
    qm: QuarkModel,
    reference: QuarkModel,
    task: str,
    prompts: Sequence[str],
    quantile: int | None,
    *,
    samples: int = 25,
    top_p: float = 0.9,
    max_new_tokens: int = 20,
    batch_size: int = 32,
    max_prompt_tokens: int | None = 64,
    toxicity_scorer: Scorer | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate ``qm`` (conditioned on ``quantile``) on ``prompts`` with the task's metrics."""
    if task == "repetition":
        return _evaluate_repetition(
            qm, prompts, quantile, max_new_tokens, batch_size, max_prompt_tokens
        )
    params = SamplingParams(max_new_tokens, 1.0, top_p)
    per_prompt = sample_many(
        qm, prompts, quantile, samples, params, batch_size, max_prompt_tokens, seed
    )
    flat_prompts = [p for p, texts in zip(prompts, per_prompt, strict=True) for _ in texts]
    flat_texts = [t for texts in per_prompt for t in texts]
    result: dict[str, Any] = {
        "prompts": len(prompts),
        "samples": samples,
        "perplexity": perplexity(
            reference, flat_prompts, flat_texts, batch_size, max_prompt_tokens
        ),
        **diversity_metrics(per_prompt),
    }
    if task == "toxicity":
        scorer = toxicity_scorer or ProfanityToxicityReward()
        rewards = scorer(flat_prompts, flat_texts)
        toxicity = [1.0 - r for r in rewards]
        result.update(
            toxicity_metrics(
                [toxicity[i * samples : (i + 1) * samples] for i in range(len(prompts))]
            )
        )
    elif task == "sentiment":
        result["positive_share"] = sum(map(is_positive_vader, flat_texts)) / len(flat_texts)
    else:
        raise ValueError(f"unknown task {task!r}: use toxicity, sentiment or repetition")
    result["examples"] = [
        {"prompt": p, "completion": t} for p, t in zip(prompts[:3], per_prompt[:3], strict=False)
    ]
    return result


def _evaluate_repetition(
    qm: QuarkModel,
    prompts: Sequence[str],
    quantile: int | None,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int | None,
) -> dict[str, Any]:
    """Greedy decoding; rep-n within each completion and diversity = prod(1 - rep-n)."""
    params = SamplingParams(max_new_tokens, greedy=True)
    completions = generate(
        qm, prompts, quantile, params, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens
    )
    tokens = [c.text.split() for c in completions]
    result: dict[str, Any] = {"prompts": len(prompts)}
    diversity = 1.0
    for n in (2, 3, 4):
        rep = sum(repeated_ngram_rate(t, n) for t in tokens) / len(tokens)
        result[f"rep-{n}"] = rep
        diversity *= 1.0 - rep
    result["diversity"] = diversity
    result["examples"] = [
        {"prompt": p, "completion": c.text}
        for p, c in zip(prompts[:3], completions[:3], strict=False)
    ]
    return result
