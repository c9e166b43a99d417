"""A model version's held-out evaluation, as the promotion gate reads it: reward per prompt,
perplexity under the original model and KL to it (:func:`evaluate_version`). The paper's full
metrics, with intervals, are :mod:`quark.evaluation`'s."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quark.batching import completion_logits, encode_pairs
from quark.evaluation import sample_many
from quark.loss import restrict_vocab, token_kl
from quark.models import QuarkModel
from quark.rewards import RewardFn
from quark.sampling import SamplingParams


@dataclass(frozen=True)
class EvalResult:
    """Top-token completions on held-out prompts: mean reward, and drift from the original.

    ``prompt_rewards`` holds each prompt's mean reward over its ``samples`` completions, in
    the order of the prompts; the promotion gate pairs two versions' results prompt by prompt.
    Empty when not recorded (a result saved before it existed)."""

    reward: float  # mean reward of the completions (higher is better)
    perplexity: float  # of the completions under the original model (fluency)
    kl: float  # mean per-token KL(version | top token || original), on those completions
    prompts: int
    samples: int
    prompt_rewards: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # A result read back from JSON has a list here: keep it a tuple (hashable, comparable).
        rewards = tuple(float(r) for r in self.prompt_rewards)
        object.__setattr__(self, "prompt_rewards", rewards)
        if rewards and len(rewards) != self.prompts:
            raise ValueError(f"{len(rewards)} per-prompt rewards for {self.prompts} prompts")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able fields (``EvalResult(**result.as_dict())`` gives it back)."""
        return {**asdict(self), "prompt_rewards": list(self.prompt_rewards)}


@torch.inference_mode()
def reference_scores(
    qm: QuarkModel,
    original: torch.nn.Module,
    prompts: Sequence[str],
    completions: Sequence[str],
    quantile: int | None,
    batch_size: int = 32,
    max_prompt_tokens: int = 64,
) -> tuple[float, float]:
    """(perplexity of the completions under the original model, per-token KL(qm(. | reward
    token + prompt) || original(. | prompt)) on them), from one forward of each model per
    batch: the original's log-probs serve both. ``quantile`` None: no reward token (the
    version's default output)."""
    nll, kl, tokens = 0.0, 0.0, 0.0
    reward_ids = qm.reward_tokens.ids if qm.reward_tokens else ()
    prefix = qm.prefix_ids(quantile)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        texts = list(completions[start : start + batch_size])
        policy_ids, policy_mask, labels, label_mask = encode_pairs(
            qm, [prefix] * len(chunk), chunk, texts, max_prompt_tokens, None
        )
        ref_ids, ref_mask, _, _ = encode_pairs(
            qm, [[]] * len(chunk), chunk, texts, max_prompt_tokens, None
        )
        width = labels.shape[1]
        vocab = qm.base_vocab_size
        # float32 logits whatever the forward's precision (an autocast caller): [B, T, V]
        policy = completion_logits(qm.model, policy_ids, policy_mask, width).float()
        ref = completion_logits(original, ref_ids, ref_mask, width).float()
        logprobs, ref_logprobs = (
            torch.log_softmax(restrict_vocab(x, vocab, reward_ids), dim=-1) for x in (policy, ref)
        )  # [B, T, V] each, normalised once
        token_lp = ref_logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
        nll -= float((token_lp * label_mask).sum())
        kl += float((token_kl(logprobs, ref_logprobs) * label_mask).sum())
        tokens += float(label_mask.sum())
    if not tokens:
        return 1.0, 0.0  # no completion tokens: exp(0), nothing to compare
    return math.exp(nll / tokens), kl / tokens


def evaluate_version(
    qm: QuarkModel,
    original: QuarkModel,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    *,
    samples: int = 2,
    max_new_tokens: int = 20,
    top_p: float = 0.9,
    seed: int = 0,
    batch_size: int = 32,
    max_prompt_tokens: int = 64,
    quantile: int | None = 0,
) -> EvalResult:
    """Sample completions for ``prompts`` conditioned on ``quantile`` (0: the top reward
    token, None: no token) and measure reward, perplexity and KL (a model version's held-out
    evaluation, as the promotion gate reads it).

    The sampling seed is fixed, so two versions evaluated on the same prompts draw the same
    random numbers: their per-prompt rewards are paired."""
    if not prompts:
        raise ValueError("evaluation needs at least one held-out prompt")
    repeated = [p for p in prompts for _ in range(samples)]
    was_training = qm.model.training
    qm.model.eval()
    params = SamplingParams(max_new_tokens, 1.0, top_p)
    grouped = sample_many(
        qm, prompts, quantile, samples, params, batch_size, max_prompt_tokens, seed
    )
    texts = [t for group in grouped for t in group]  # aligned with ``repeated``
    rewards = reward_fn(repeated, texts)
    per_prompt = [rewards[i * samples : (i + 1) * samples] for i in range(len(prompts))]
    ppl, kl = reference_scores(
        qm, original.model, repeated, texts, quantile, batch_size, max_prompt_tokens
    )
    result = EvalResult(
        reward=sum(rewards) / len(rewards),
        perplexity=ppl,
        kl=kl,
        prompts=len(prompts),
        samples=samples,
        prompt_rewards=tuple(sum(r) / len(r) for r in per_prompt),
    )
    qm.model.train(was_training)
    return result
