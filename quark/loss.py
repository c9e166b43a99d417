"""The Quark objective as one pure function over tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossStats:
    loss: float
    nll: float
    kl: float
    entropy: float
    tokens: int
    # reference_kl on utility passages (0.0 while the term is off); ``loss`` includes its
    # weighted share when it is on.
    utility_kl: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "nll": self.nll,
            "kl": self.kl,
            "entropy": self.entropy,
            "tokens": float(self.tokens),
            "utility_kl": self.utility_kl,
        }


@dataclass(frozen=True)
class KLStats:
    kl: float  # mean over real positions of KL(pi_theta || pi_ref), summed over the vocabulary
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "tokens": float(self.tokens)}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def restrict_vocab(
    logits: torch.Tensor, vocab_size: int, excluded_ids: tuple[int, ...] = ()
) -> torch.Tensor:
    """Keep the first ``vocab_size`` logits and rule out ``excluded_ids`` inside that range.

    Used to compare the policy (original vocab + reward tokens) with the reference model
    (original vocab only) over the same support: the reward tokens are never targets.
    """
    logits = logits[..., :vocab_size]
    inside = [i for i in excluded_ids if i < vocab_size]
    if inside:
        logits = logits.clone()
        logits[..., inside] = torch.finfo(logits.dtype).min
    return logits


def token_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, probs: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(pi_theta || pi_ref) at every position, summed over the vocabulary: [B, T].

    logprobs, ref_logprobs: [B, T, V] normalised log-probabilities of the policy and the
        reference (detach the reference: only the policy should move).
    probs: ``logprobs.exp()`` when the caller has it (quark_loss shares it with the entropy,
        which keeps its gradient bit-for-bit what it was before this helper existed).
    """
    probs = logprobs.exp() if probs is None else probs
    return (probs * (logprobs - ref_logprobs)).sum(-1)


def _check_shapes(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> None:
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"logit shapes differ: {policy_logits.shape} vs {ref_logits.shape}")


def reference_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, KLStats]:
    """Mean over real positions of KL(pi_theta || pi_ref), each summed over the vocabulary.

    Quark's own KL only covers the completion tokens of pooled samples; this one is applied
    to any text (utility passages), so that the rest of the distribution stays near the
    reference's.

    policy_logits: [B, T, V] logits of the policy, restricted to the shared vocabulary.
    ref_logits:    [B, T, V] logits of the frozen reference at the same positions; no
        gradient flows into them.
    mask:          [B, T] 1.0 at positions that count, 0.0 for padding.
    """
    _check_shapes(policy_logits, ref_logits)
    mask = mask.to(policy_logits.dtype)
    kl = token_kl(
        F.log_softmax(policy_logits, dim=-1), F.log_softmax(ref_logits.detach(), dim=-1)
    )  # [B, T]
    loss = masked_mean(kl, mask)
    return loss, KLStats(kl=float(loss.detach()), tokens=int(mask.sum().item()))


def quark_loss(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    entropy_coef: float,
) -> tuple[torch.Tensor, LossStats]:
    """NLL of the completion + kl_coef * KL(pi_theta || pi_ref) - entropy_coef * entropy.

    policy_logits: [B, T, V] logits of the policy (conditioned on reward token + prompt) at
        the positions that predict completion tokens, restricted to the shared vocabulary.
    ref_logits:    [B, T, V] logits of the frozen reference (prompt without reward token)
        at the same completion positions; no gradient flows into them.
    labels:        [B, T] completion token ids.
    mask:          [B, T] 1.0 for real completion tokens, 0.0 for padding.
    """
    _check_shapes(policy_logits, ref_logits)
    mask = mask.to(policy_logits.dtype)
    logprobs = F.log_softmax(policy_logits, dim=-1)  # [B, T, V]
    ref_logprobs = F.log_softmax(ref_logits.detach(), dim=-1)  # [B, T, V]
    token_logprobs = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    probs = logprobs.exp()
    kl = token_kl(logprobs, ref_logprobs, probs)  # [B, T]
    entropy = -(probs * logprobs).sum(-1)  # [B, T]
    nll = masked_mean(-token_logprobs, mask)
    kl_mean = masked_mean(kl, mask)
    entropy_mean = masked_mean(entropy, mask)
    loss = nll + kl_coef * kl_mean - entropy_coef * entropy_mean
    stats = LossStats(
        loss=float(loss.detach()),
        nll=float(nll.detach()),
        kl=float(kl_mean.detach()),
        entropy=float(entropy_mean.detach()),
        tokens=int(mask.sum().item()),
    )
    return loss, stats
