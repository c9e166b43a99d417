"""The ACFT objectives as pure functions over tensors (no model, no sampling).

Notation (docs/acft.md): p is the frozen *base* distribution the auxiliary model was trained
for (the model whose samples the oracle labelled), R(x<t, v) = sigmoid(r_logits[..., v]) the
probability that a continuation of prefix x<t followed by v satisfies the constraint C, and
p_theta the model being fine-tuned. All tensors are over the completion positions of a
batch: position t holds the distribution over completion token t given everything before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quark.loss import masked_mean

#: Bernoulli probabilities are kept inside [EPS, 1 - EPS] in the consistency term, so a
#: prefix that surely (never) satisfies C gives a large but finite penalty, never NaN.
EPS = 1e-6


@dataclass(frozen=True)
class NadoStats:
    loss: float
    bce: float  # mean binary cross-entropy of R(x<t, x_t) against C(x)
    consistency: float  # mean KL(Bern(sum_v p(v|x<=t) R(x<=t, v)) || Bern(R(x<t, x_t)))
    accuracy: float  # share of real positions where R(x<t, x_t) > 0.5 agrees with C(x)
    r_satisfied: float  # mean R(x<t, x_t) over positions of satisfying sequences
    r_violated: float  # mean R(x<t, x_t) over positions of violating sequences
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "bce": self.bce,
            "consistency": self.consistency,
            "accuracy": self.accuracy,
            "r_satisfied": self.r_satisfied,
            "r_violated": self.r_violated,
            "tokens": float(self.tokens),
        }


@dataclass(frozen=True)
class ACFTStats:
    loss: float
    nll: float
    kl: float  # mean over real positions of KL(q || p_theta), summed over the vocabulary
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "nll": self.nll, "kl": self.kl, "tokens": float(self.tokens)}


def q_logprobs(base_logprobs: torch.Tensor, r_logits: torch.Tensor) -> torch.Tensor:
    """log q(v | x<t) with q(v | x<t) = p(v | x<t) R(x<t, v) / sum_u p(u | x<t) R(x<t, u).

    base_logprobs: [B, T, V] log p(v | x<t) of the base model (any logits work: q is
        renormalised, so an unnormalised log p only shifts every entry equally).
    r_logits:      [B, T, V] logit of R(x<t, v).
    Returns [B, T, V], a normalised log distribution at every position, computed in log
    space (log p + log sigmoid(r) - logsumexp) so tiny R or p never underflow to 0/0.
    """
    if base_logprobs.shape != r_logits.shape:
        raise ValueError(f"shapes differ: {base_logprobs.shape} vs {r_logits.shape}")
    joint = base_logprobs + F.logsigmoid(r_logits)  # [B, T, V] log p(v) R(v)
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


def bernoulli_kl(p: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p) || Bern(sigmoid(q_logits))), elementwise; p is clamped to [EPS, 1 - EPS]."""
    p = p.clamp(EPS, 1.0 - EPS)
    return p * (p.log() - F.logsigmoid(q_logits)) + (1.0 - p) * (
        torch.log1p(-p) - F.logsigmoid(-q_logits)
    )


def nado_loss(
    r_logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    satisfied: torch.Tensor,
    base_logprobs: torch.Tensor,
    consistency_coef: float,
) -> tuple[torch.Tensor, NadoStats]:
    """NADO's objective for the auxiliary model: BCE + consistency_coef * consistency.

    r_logits:      [B, T, V] logits of R(x<t, v) at the completion positions (the head's
        output; the only input gradients should reach).
    tokens:        [B, T] completion token ids sampled from p (x_t, right-aligned).
    mask:          [B, T] 1.0 for real completion tokens, 0.0 for padding.
    satisfied:     [B] C(x) of each whole sample: 1 (satisfies the constraint) or 0.
    base_logprobs: [B, T, V] log p(v | x<t) of the base model the samples came from.

    * BCE: every real position t trains R(x<t, x_t), the value of the prefix x<=t, towards
      the sequence label C(x) (its conditional expectation given x<=t is exactly R(x<=t)).
    * Consistency (NADO's regulariser, direction of the official GPT-2 code): the one-step
      expectation sum_v p(v | x<=t) R(x<=t, v), computed at position t+1, must equal the
      value R(x<t, x_t) predicted at position t for the same prefix; penalised as the
      Bernoulli KL between the two, on pairs of adjacent real positions. Gradients reach
      both sides. The first position (the prompt alone) has no predicted value to match and
      is not regularised (as in the official code).
    Both terms are means over real positions (pairs), not sums per sequence.
    """
    if r_logits.shape != base_logprobs.shape:
        raise ValueError(f"shapes differ: {r_logits.shape} vs {base_logprobs.shape}")
    mask = mask.to(r_logits.dtype)
    taken = r_logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T] logit R(x<=t)
    labels = satisfied.to(r_logits.dtype).unsqueeze(-1).expand_as(taken)  # [B, T]
    bce = F.binary_cross_entropy_with_logits(taken, labels, reduction="none")  # [B, T]
    bce_mean = masked_mean(bce, mask)

    # log sum_v p(v | x<=t) R(x<=t, v) at positions 1..T-1: [B, T-1]
    log_expect = torch.logsumexp(base_logprobs[:, 1:] + F.logsigmoid(r_logits[:, 1:]), dim=-1)
    pair_mask = mask[:, 1:] * mask[:, :-1]  # [B, T-1] both positions real
    consistency = bernoulli_kl(log_expect.exp(), taken[:, :-1])  # [B, T-1]
    consistency_mean = masked_mean(consistency, pair_mask)
    loss = bce_mean + consistency_coef * consistency_mean

    with torch.no_grad():
        r_taken = torch.sigmoid(taken)
        correct = ((r_taken > 0.5).to(r_taken.dtype) == labels).to(r_taken.dtype)
        good = mask * labels
        bad = mask * (1.0 - labels)
        stats = NadoStats(
            loss=float(loss.detach()),
            bce=float(bce_mean.detach()),
            consistency=float(consistency_mean.detach()),
            accuracy=float(masked_mean(correct, mask)),
            r_satisfied=float(masked_mean(r_taken, good)),
            r_violated=float(masked_mean(r_taken, bad)),
            tokens=int(mask.sum().item()),
        )
    return loss, stats


def acft_loss(
    policy_logits: torch.Tensor,
    q_logprobs: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, ACFTStats]:
    """NLL of the corpus tokens + kl_coef * KL(q || p_theta), per position, closed form.

    policy_logits: [B, T, V] logits of the model being fine-tuned at the completion positions.
    q_logprobs:    [B, T, V] log q(v | x<t) (``q_logprobs(...)``); a fixed target, detached.
    labels:        [B, T] corpus completion token ids.
    mask:          [B, T] 1.0 for real completion tokens, 0.0 for padding.

    KL(q || p_theta) = sum_v q(v) (log q(v) - log p_theta(v)); its gradient in theta is the
    cross-entropy of p_theta against the soft target q. Entries with q(v) = 0 contribute 0.
    Ruling a token out of q takes the dtype's most negative value (``restrict_vocab``) or
    -inf; NaN never appears.
    """
    if policy_logits.shape != q_logprobs.shape:
        raise ValueError(f"shapes differ: {policy_logits.shape} vs {q_logprobs.shape}")
    mask = mask.to(policy_logits.dtype)
    logprobs = F.log_softmax(policy_logits, dim=-1)  # [B, T, V]
    # -inf (an impossible token) -> the most negative float: exp gives q = 0, never 0 * inf.
    target = q_logprobs.detach().clamp(min=torch.finfo(q_logprobs.dtype).min)
    token_logprobs = logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    # sum_v q(v) (log q(v) - log p_theta(v)): [B, T]
    kl = F.kl_div(logprobs, target, reduction="none", log_target=True).sum(-1)
    nll = masked_mean(-token_logprobs, mask)
    kl_mean = masked_mean(kl, mask)
    loss = nll + kl_coef * kl_mean
    stats = ACFTStats(
        loss=float(loss.detach()),
        nll=float(nll.detach()),
        kl=float(kl_mean.detach()),
        tokens=int(mask.sum().item()),
    )
    return loss, stats


def guidance_kl(q_logprobs: torch.Tensor, base_logprobs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over real positions of KL(q || p): how far the guidance moves the target away
    from the base model (0 while R is constant, e.g. an untrained zero-initialised head)."""
    base = F.log_softmax(base_logprobs.detach().float(), dim=-1)
    target = q_logprobs.detach().float().clamp(min=torch.finfo(torch.float32).min)
    kl = F.kl_div(base, target, reduction="none", log_target=True).sum(-1)  # [B, T]
    return float(masked_mean(kl, mask.to(kl.dtype)))
