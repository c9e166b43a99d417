"""Held-out evaluation of a model version and the promotion gate (plain functions)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from quark.batching import build_batch, completion_logits
from quark.evaluation import perplexity
from quark.loss import quark_loss, restrict_vocab
from quark.models import QuarkModel
from quark.pool import QuantizedSample
from quark.rewards import RewardFn
from quark.sampling import SamplingParams, generate


@dataclass(frozen=True)
class EvalResult:
    """Top-token completions on held-out prompts: mean reward, and drift from the original."""

    reward: float  # mean reward of the completions (higher is better)
    perplexity: float  # of the completions under the original model (fluency)
    kl: float  # mean per-token KL(version | top token || original), on those completions
    prompts: int
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons)}


def promotion_gate(
    candidate: EvalResult,
    active: EvalResult,
    *,
    reward_tolerance: float = 0.0,
    max_perplexity_rise: float = 0.25,
    max_kl: float | None = None,
) -> GateDecision:
    """Promote ``candidate`` only if its reward is not worse than the active version's (within
    ``reward_tolerance``), its perplexity rose by at most ``max_perplexity_rise`` (relative),
    and, when ``max_kl`` is given, its mean per-token KL to the original model is at most that.

    The first two compare with the active version, so small steps can add up over many
    versions; the KL bound is absolute (against the original), so it caps the total drift.

    Both are measured on the same held-out prompts with the same seed, so the comparison is
    paired; non-finite numbers always fail (a diverged model must never be served).
    """
    reasons = []
    numbers = (candidate.reward, candidate.perplexity, active.reward, active.perplexity)
    if not all(math.isfinite(x) for x in numbers):
        reasons.append(f"non-finite evaluation: candidate={candidate}, active={active}")
        return GateDecision(False, tuple(reasons))
    floor = active.reward - reward_tolerance
    if candidate.reward < floor:
        reasons.append(
            f"reward {candidate.reward:.4f} is below the active version's "
            f"{active.reward:.4f} - tolerance {reward_tolerance:g}"
        )
    ceiling = active.perplexity * (1.0 + max_perplexity_rise)
    if candidate.perplexity > ceiling:
        reasons.append(
            f"perplexity {candidate.perplexity:.2f} exceeds the active version's "
            f"{active.perplexity:.2f} x (1 + {max_perplexity_rise:g})"
        )
    if max_kl is not None and not candidate.kl <= max_kl:  # NaN fails too
        reasons.append(f"KL to the original {candidate.kl:.4f} exceeds the bound {max_kl:g}")
    return GateDecision(not reasons, tuple(reasons))


def is_held_out(prompt: str, fraction: float, salt: str = "quark-eval") -> bool:
    """A stable pseudo-random split by prompt text: the same prompt is always on one side,
    so held-out prompts never leak into training, in this job or any later one."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{salt}:{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@torch.inference_mode()
def mean_kl(
    qm: QuarkModel,
    original: torch.nn.Module,
    prompts: Sequence[str],
    completions: Sequence[str],
    quantile: int | None,
    batch_size: int = 32,
    max_prompt_tokens: int = 64,
) -> float:
    """Per-token KL(qm(. | reward token + prompt) || original(. | prompt)) on completions."""
    total, tokens = 0.0, 0
    reward_ids = qm.reward_tokens.ids if qm.reward_tokens else ()
    for start in range(0, len(prompts), batch_size):
        samples = [
            QuantizedSample(p, c, 0.0, quantile if quantile is not None else 0)
            for p, c in zip(
                prompts[start : start + batch_size],
                completions[start : start + batch_size],
                strict=True,
            )
        ]
        batch = build_batch(qm, samples, max_prompt_tokens, 10_000)
        width = batch.labels.shape[1]
        policy = completion_logits(qm.model, batch.policy_ids, batch.policy_mask, width)
        ref = completion_logits(original, batch.ref_ids, batch.ref_mask, width)
        vocab = qm.base_vocab_size
        _, stats = quark_loss(
            restrict_vocab(policy, vocab, reward_ids),
            restrict_vocab(ref, vocab, reward_ids),
            batch.labels,
            batch.label_mask,
            0.0,
            0.0,
        )
        total += stats.kl * stats.tokens
        tokens += stats.tokens
    return total / tokens if tokens else 0.0


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
) -> EvalResult:
    """Sample top-token completions for ``prompts`` and measure reward, perplexity and KL."""
    if not prompts:
        raise ValueError("evaluation needs at least one held-out prompt")
    repeated = [p for p in prompts for _ in range(samples)]
    was_training = qm.model.training
    qm.model.eval()
    params = SamplingParams(max_new_tokens, 1.0, top_p)
    texts = [
        c.text
        for c in generate(
            qm, repeated, 0, params, batch_size=batch_size, max_prompt_tokens=64, seed=seed
        )
    ]
    rewards = reward_fn(repeated, texts)
    result = EvalResult(
        reward=sum(rewards) / len(rewards),
        perplexity=perplexity(original, repeated, texts, batch_size, 64),
        kl=mean_kl(qm, original.model, repeated, texts, 0, batch_size),
        prompts=len(prompts),
        samples=samples,
    )
    qm.model.train(was_training)
    return result
