"""quark.acft.loss on hand-built tensors: q = p R renormalised, the ACFT loss, NADO's loss.

The exact-R tests enumerate every sequence of a toy language (3 tokens, length 3) so the
true success probabilities R are known: they check the equations themselves, not just shapes.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from quark.acft.loss import acft_loss, bernoulli_kl, guidance_kl, nado_loss, q_logprobs


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- q ------------------------------------------------------------------------------------------
def test_q_sums_to_one_everywhere_even_for_extreme_inputs() -> None:
    base = torch.randn(3, 5, 11, generator=_gen(0)).log_softmax(-1)
    r = 30 * torch.randn(3, 5, 11, generator=_gen(1))  # R from ~1e-13 to ~1
    base[0, 0, 3] = torch.finfo(base.dtype).min  # a token ruled out (restrict_vocab's value)
    r[1, 2] = -80.0  # every token nearly hopeless at one position: still a distribution
    q = q_logprobs(base, r)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.exp().sum(-1), torch.ones(3, 5), atol=1e-5, rtol=0)
    assert q[0, 0, 3].exp() == 0


def test_q_matches_hand_computation() -> None:
    p, big_r = [0.5, 0.3, 0.2], [0.9, 0.1, 0.5]
    expected = [
        pi * ri / sum(a * b for a, b in zip(p, big_r, strict=True))
        for pi, ri in zip(p, big_r, strict=True)
    ]
    base = torch.tensor([[p]]).log()
    r = torch.logit(torch.tensor([[big_r]]))
    assert q_logprobs(base, r).exp()[0, 0].tolist() == pytest.approx(expected, rel=1e-5)


def test_constant_r_leaves_the_base_distribution() -> None:
    base = torch.randn(2, 4, 9, generator=_gen(2)).log_softmax(-1)
    for value in (-3.0, 0.0, 5.0):
        q = q_logprobs(base, torch.full_like(base, value))
        torch.testing.assert_close(q, base, atol=1e-5, rtol=0)


# -- acft_loss ----------------------------------------------------------------------------------
def test_kl_is_zero_when_r_is_constant_and_policy_equals_reference() -> None:
    logits = torch.randn(2, 4, 9, generator=_gen(3))
    labels = torch.randint(0, 9, (2, 4), generator=_gen(4))
    q = q_logprobs(logits.log_softmax(-1), torch.zeros(2, 4, 9))
    loss, stats = acft_loss(logits, q, labels, torch.ones(2, 4), kl_coef=2.0)
    assert abs(stats.kl) < 1e-6
    assert stats.loss == pytest.approx(stats.nll, abs=1e-5)
    assert float(loss) == pytest.approx(stats.loss)


def test_kl_is_positive_when_r_discriminates_and_policy_equals_reference() -> None:
    p, big_r = [0.5, 0.3, 0.2], [0.9, 0.1, 0.5]
    z = sum(a * b for a, b in zip(p, big_r, strict=True))
    q = [pi * ri / z for pi, ri in zip(p, big_r, strict=True)]
    expected = sum(qi * math.log(qi / pi) for qi, pi in zip(q, p, strict=True))
    logits = torch.tensor([[p]]).log()
    target = q_logprobs(logits, torch.logit(torch.tensor([[big_r]])))
    loss, stats = acft_loss(logits, target, torch.tensor([[0]]), torch.ones(1, 1), kl_coef=0.5)
    assert expected > 0.05
    assert stats.kl == pytest.approx(expected, rel=1e-5)
    # Direction matters: KL(q || p_theta), not KL(p_theta || q).
    reverse = sum(pi * math.log(pi / qi) for qi, pi in zip(q, p, strict=True))
    assert stats.kl != pytest.approx(reverse, rel=1e-2)
    assert stats.nll == pytest.approx(-math.log(0.5), rel=1e-5)
    assert float(loss) == pytest.approx(-math.log(0.5) + 0.5 * expected, rel=1e-5)
    assert guidance_kl(target, logits, torch.ones(1, 1)) == pytest.approx(expected, rel=1e-5)


def test_kl_gradient_pulls_the_policy_towards_q() -> None:
    """d KL(q || softmax(z)) / dz = p_theta - q: one gradient step moves mass towards q."""
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    target = torch.tensor([[[0.7, 0.1, 0.1, 0.1]]]).log()
    loss, _ = acft_loss(logits, target, torch.tensor([[0]]), torch.ones(1, 1), kl_coef=1.0)
    loss.backward()
    assert logits.grad is not None
    nll_grad = torch.tensor([0.25 - 1, 0.25, 0.25, 0.25])
    kl_grad = torch.tensor([0.25 - 0.7, 0.25 - 0.1, 0.25 - 0.1, 0.25 - 0.1])
    torch.testing.assert_close(logits.grad[0, 0], nll_grad + kl_grad, atol=1e-6, rtol=0)


def test_impossible_tokens_in_q_never_give_nan() -> None:
    logits = torch.randn(1, 2, 5, generator=_gen(5), requires_grad=True)
    target = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]).log().expand(1, 2, 5)  # -inf entries
    loss, stats = acft_loss(logits, target, torch.tensor([[0, 1]]), torch.ones(1, 2), 1.0)
    loss.backward()
    assert math.isfinite(stats.kl) and stats.kl > 0
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_acft_padded_positions_change_nothing() -> None:
    logits = torch.randn(2, 3, 6, generator=_gen(6))
    target = torch.randn(2, 3, 6, generator=_gen(7)).log_softmax(-1)
    labels = torch.randint(0, 6, (2, 3), generator=_gen(8))
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    _, stats = acft_loss(logits, target, labels, mask, 0.7)
    logits2, target2, labels2 = logits.clone(), target.clone(), labels.clone()
    logits2[mask == 0] = 50 * torch.randn(int((mask == 0).sum()), 6, generator=_gen(9))
    target2[mask == 0] = torch.tensor([1.0, 0, 0, 0, 0, 0]).clamp(min=1e-9).log()
    labels2[mask == 0] = 5
    _, stats2 = acft_loss(logits2, target2, labels2, mask, 0.7)
    assert stats2 == stats


def test_acft_all_padding_is_zero_not_nan() -> None:
    logits = torch.randn(1, 2, 4, generator=_gen(10))
    target = logits.log_softmax(-1)
    _, stats = acft_loss(
        logits, target, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2), 1.0
    )
    assert stats.loss == 0.0 and stats.tokens == 0


# -- nado_loss ----------------------------------------------------------------------------------
def test_bernoulli_kl_is_zero_on_the_diagonal_and_positive_off_it() -> None:
    p = torch.tensor([0.1, 0.5, 0.9])
    assert bernoulli_kl(p, torch.logit(p)).abs().max() < 1e-6
    expected = 0.1 * math.log(0.1 / 0.5) + 0.9 * math.log(0.9 / 0.5)
    assert float(bernoulli_kl(torch.tensor(0.1), torch.tensor(0.0))) == pytest.approx(expected)


def test_nado_bce_matches_hand_computation_and_ignores_other_tokens() -> None:
    r = torch.zeros(2, 2, 4)
    r[0, 0, 1], r[0, 1, 2] = 2.0, -1.0  # the taken tokens of sequence 0
    r[1, 0, 3], r[1, 1, 0] = 0.5, 3.0  # of sequence 1
    tokens = torch.tensor([[1, 2], [3, 0]])
    satisfied = torch.tensor([1.0, 0.0])
    base = torch.zeros(2, 2, 4).log_softmax(-1)
    _, stats = nado_loss(r, tokens, torch.ones(2, 2), satisfied, base, consistency_coef=0.0)

    def bce(logit: float, label: float) -> float:
        prob = 1 / (1 + math.exp(-logit))
        return -(label * math.log(prob) + (1 - label) * math.log(1 - prob))

    expected = (bce(2.0, 1) + bce(-1.0, 1) + bce(0.5, 0) + bce(3.0, 0)) / 4
    assert stats.bce == pytest.approx(expected, rel=1e-5)
    assert stats.loss == pytest.approx(expected, rel=1e-5)
    # R > 1/2 agrees with C only for logit 2.0 (C = 1); -1.0 (C = 1), 0.5 and 3.0 (C = 0) miss.
    assert stats.accuracy == pytest.approx(1 / 4)
    assert stats.tokens == 4


def test_nado_padded_positions_change_nothing() -> None:
    r = torch.randn(2, 4, 7, generator=_gen(11))
    base = torch.randn(2, 4, 7, generator=_gen(12)).log_softmax(-1)
    tokens = torch.randint(0, 7, (2, 4), generator=_gen(13))
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    satisfied = torch.tensor([1.0, 0.0])
    _, stats = nado_loss(r, tokens, mask, satisfied, base, consistency_coef=1.0)
    r2, base2, tokens2 = r.clone(), base.clone(), tokens.clone()
    r2[mask == 0] = 40 * torch.randn(int((mask == 0).sum()), 7, generator=_gen(14))
    base2[mask == 0] = torch.randn(int((mask == 0).sum()), 7, generator=_gen(15)).log_softmax(-1)
    tokens2[mask == 0] = 6
    _, stats2 = nado_loss(r2, tokens2, mask, satisfied, base2, consistency_coef=1.0)
    assert stats2 == stats
    assert stats.consistency > 0  # random R is not consistent: the pairs did count


def test_nado_loss_learns_the_labels_on_a_toy_problem() -> None:
    """Free R logits trained by gradient descent: the loss falls and R of the taken tokens
    moves to the sequence labels (two sequences share a first token with opposite labels,
    so its R converges between them, as the conditional probability should)."""
    torch.manual_seed(0)
    tokens = torch.tensor([[1, 2, 3], [1, 0, 0], [2, 2, 1], [3, 3, 3]])
    satisfied = torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask = torch.ones(4, 3)
    base = torch.randn(4, 3, 5, generator=_gen(16)).log_softmax(-1)
    r = torch.zeros(4, 3, 5, requires_grad=True)
    optimizer = torch.optim.Adam([r], lr=0.1)
    losses = []
    for _ in range(200):
        loss, stats = nado_loss(r, tokens, mask, satisfied, base, consistency_coef=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(stats.loss)
    assert losses[-1] < 0.5 * losses[0]
    assert stats.r_satisfied > 0.8 and stats.r_violated < 0.2
    assert stats.accuracy == 1.0


def test_nado_bce_trains_only_the_taken_tokens_and_consistency_spreads_by_p() -> None:
    """Without consistency only R(x<t, x_t) gets a gradient; the consistency term also reaches
    every token v at positions t >= 1, in proportion to p(v | x<t)."""
    r = torch.randn(1, 3, 4, generator=_gen(17), requires_grad=True)
    base = torch.randn(1, 3, 4, generator=_gen(18)).log_softmax(-1)
    tokens = torch.tensor([[0, 1, 2]])
    loss, _ = nado_loss(r, tokens, torch.ones(1, 3), torch.ones(1), base, consistency_coef=0.0)
    loss.backward()
    assert r.grad is not None
    taken = F.one_hot(tokens, 4).bool()
    assert (r.grad[taken] != 0).all() and (r.grad[~taken] == 0).all()

    r.grad = None
    loss, _ = nado_loss(r, tokens, torch.ones(1, 3), torch.ones(1), base, consistency_coef=1.0)
    loss.backward()
    assert r.grad is not None
    assert (r.grad[0, 1:] != 0).all()  # every token of positions 1.. (the one-step expectation)
    assert (r.grad[0, 0][~taken[0, 0]] == 0).all()  # position 0: only its taken token


# -- exact R on a toy language: consistency is zero and q is the constrained distribution ------
VOCAB, LENGTH, FORBIDDEN = 3, 3, 2
CLAMP = 1e-6


def _toy_language() -> tuple[dict[tuple[int, ...], torch.Tensor], dict[tuple[int, ...], float]]:
    """p(. | prefix) for every prefix and the exact R(prefix) = P(no FORBIDDEN token | prefix)."""
    gen = _gen(19)
    probs = {
        prefix: torch.randn(VOCAB, generator=gen).softmax(-1)
        for n in range(LENGTH)
        for prefix in itertools.product(range(VOCAB), repeat=n)
    }
    value: dict[tuple[int, ...], float] = {}
    for n in range(LENGTH, -1, -1):
        for prefix in itertools.product(range(VOCAB), repeat=n):
            if FORBIDDEN in prefix:
                value[prefix] = 0.0
            elif n == LENGTH:
                value[prefix] = 1.0
            else:
                value[prefix] = sum(
                    float(probs[prefix][v]) * value[(*prefix, v)] for v in range(VOCAB)
                )
    return probs, value


def _toy_tensors(
    noise: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sequence as a batch row: tokens [N, L], base log-probs and R logits [N, L, V]
    (the exact R, plus ``noise`` x N(0, 1) per *prefix*, so rows sharing a prefix share
    its value), and C [N]."""
    probs, value = _toy_language()
    gen = _gen(100 + seed)
    logit = {
        prefix: math.log(max(r, CLAMP) / max(1 - r, CLAMP))
        + noise * float(torch.randn(1, generator=gen))
        for prefix, r in sorted(value.items())
    }
    rows = list(itertools.product(range(VOCAB), repeat=LENGTH))
    tokens = torch.tensor(rows)
    base = torch.stack([torch.stack([probs[row[:t]] for t in range(LENGTH)]) for row in rows]).log()
    r_logits = torch.tensor(
        [[[logit[(*row[:t], v)] for v in range(VOCAB)] for t in range(LENGTH)] for row in rows]
    )
    satisfied = torch.tensor([float(FORBIDDEN not in row) for row in rows])
    return tokens, base, r_logits, satisfied


def test_consistency_is_zero_for_the_exact_r() -> None:
    tokens, base, r_logits, satisfied = _toy_tensors()
    _, stats = nado_loss(r_logits, tokens, torch.ones_like(base[..., 0]), satisfied, base, 1.0)
    assert stats.consistency < 1e-5
    # ...and a perturbed R is not consistent.
    noisy = _toy_tensors(noise=1.0)[2]
    _, worse = nado_loss(noisy, tokens, torch.ones_like(base[..., 0]), satisfied, base, 1.0)
    assert worse.consistency > 100 * max(stats.consistency, 1e-7)


def test_exact_r_minimises_the_expected_bce() -> None:
    """Weighted by p(x), the BCE's minimiser over R(x<t, x_t) is P(C | x<=t): the exact R
    beats perturbations of it (one value per prefix, as a model of the prefix has)."""
    tokens, base, r_logits, satisfied = _toy_tensors()
    weights = base.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1).exp()  # p(x): [N]

    def expected_bce(logits: torch.Tensor) -> float:
        taken = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        labels = satisfied.unsqueeze(-1).expand_as(taken)
        bce = F.binary_cross_entropy_with_logits(taken, labels, reduction="none").sum(-1)
        return float((weights * bce).sum())

    best = expected_bce(r_logits)
    for seed in range(5):
        assert expected_bce(_toy_tensors(noise=0.3, seed=seed)[2]) > best


def test_q_from_the_exact_r_is_the_constrained_distribution() -> None:
    """prod_t q(x_t | x<t) = p(x) C(x) / sum_x' p(x') C(x'), for every sequence x."""
    tokens, base, r_logits, satisfied = _toy_tensors()
    q = q_logprobs(base, r_logits)
    q_seq = q.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1).exp()  # [N]
    p_seq = base.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).sum(-1).exp()
    wanted = p_seq * satisfied / (p_seq * satisfied).sum()
    torch.testing.assert_close(q_seq, wanted, atol=1e-4, rtol=0)
    assert float(q_seq.sum()) == pytest.approx(1.0, abs=1e-5)
