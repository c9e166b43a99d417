"""quark.loss on hand-built tensors: NLL, per-token KL(policy || reference), entropy, masking,
and the utility term's reference_kl."""

from __future__ import annotations

import math

import pytest
import torch

from quark.loss import masked_mean, quark_loss, reference_kl, restrict_vocab, token_kl


def _softmax(values: list[float]) -> list[float]:
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_kl_is_zero_when_policy_equals_reference() -> None:
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(1))
    _, stats = quark_loss(logits, logits.clone(), labels, torch.ones(2, 4), 0.05, 0.06)
    assert abs(stats.kl) < 1e-6


def test_kl_matches_hand_computation_for_one_token_three_words() -> None:
    policy, reference = [0.0, 1.0, 2.0], [2.0, 0.0, -1.0]
    p, q = _softmax(policy), _softmax(reference)
    expected_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    _, stats = quark_loss(
        torch.tensor([[policy]]),
        torch.tensor([[reference]]),
        torch.tensor([[1]]),
        torch.ones(1, 1),
        kl_coef=0.05,
        entropy_coef=0.06,
    )
    assert expected_kl > 0.5  # the two distributions are far apart
    assert stats.kl == pytest.approx(expected_kl, rel=1e-5)
    # Direction matters: KL(policy || reference), not KL(reference || policy).
    reverse = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert stats.kl != pytest.approx(reverse, rel=1e-3)


def test_nll_entropy_and_total_match_hand_example() -> None:
    policy = [0.5, -1.0, 2.0]
    p = _softmax(policy)
    loss, stats = quark_loss(
        torch.tensor([[policy]]),
        torch.tensor([[[0.0, 0.0, 0.0]]]),
        torch.tensor([[2]]),
        torch.ones(1, 1),
        kl_coef=0.5,
        entropy_coef=0.25,
    )
    entropy = -sum(pi * math.log(pi) for pi in p)
    kl = sum(pi * math.log(pi / (1 / 3)) for pi in p)
    assert stats.nll == pytest.approx(-math.log(p[2]), rel=1e-5)
    assert stats.entropy == pytest.approx(entropy, rel=1e-5)
    assert stats.kl == pytest.approx(kl, rel=1e-5)
    assert float(loss) == pytest.approx(-math.log(p[2]) + 0.5 * kl - 0.25 * entropy, rel=1e-5)
    assert stats.loss == pytest.approx(float(loss))
    assert stats.tokens == 1


def test_entropy_of_uniform_logits_is_log_vocab() -> None:
    vocab = 11
    logits = torch.full((3, 5, vocab), 0.7)
    _, stats = quark_loss(
        logits, logits, torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5), 0.05, 0.06
    )
    assert stats.entropy == pytest.approx(math.log(vocab), rel=1e-6)
    assert stats.nll == pytest.approx(math.log(vocab), rel=1e-6)


def test_masked_positions_do_not_count() -> None:
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([9.0, -9.0, 0.0, 0.0])  # the masked position: a huge NLL
    labels = torch.tensor([[0, 1]])
    _, stats = quark_loss(logits, torch.zeros(1, 2, 4), labels, torch.tensor([[1.0, 0.0]]), 0, 0)
    assert stats.nll == pytest.approx(math.log(4), rel=1e-6)
    assert stats.tokens == 1


def test_gradient_flows_only_where_mask_is_one() -> None:
    generator = torch.Generator().manual_seed(0)
    policy = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    reference = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=generator)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    loss, _ = quark_loss(policy, reference, labels, mask, kl_coef=0.05, entropy_coef=0.06)
    loss.backward()
    assert policy.grad is not None
    per_position = policy.grad.abs().sum(-1)  # [B, T]
    assert torch.all(per_position[mask == 0] == 0)
    assert torch.all(per_position[mask == 1] > 0)
    assert reference.grad is None  # the reference is a fixed target


def test_empty_mask_gives_finite_zero_loss() -> None:
    policy = torch.randn(2, 3, 5, requires_grad=True)
    loss, stats = quark_loss(
        policy, torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), 1, 1
    )
    assert math.isfinite(loss.item()) and loss.item() == 0.0
    assert stats.tokens == 0
    loss.backward()
    assert policy.grad is not None and torch.all(policy.grad == 0)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        quark_loss(
            torch.zeros(1, 2, 5),
            torch.zeros(1, 2, 6),
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 2),
            0.05,
            0.06,
        )


def test_masked_mean() -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    assert float(masked_mean(values, torch.tensor([1.0, 1.0, 1.0, 0.0]))) == pytest.approx(2.0)
    assert float(masked_mean(values, torch.zeros(4))) == 0.0


def test_restrict_vocab_drops_columns_beyond_the_base_vocab() -> None:
    logits = torch.arange(16, dtype=torch.float32).reshape(1, 2, 8)
    kept = restrict_vocab(logits, 6, excluded_ids=(6, 7))
    assert kept.shape == (1, 2, 6)
    assert torch.equal(kept, logits[..., :6])


def test_restrict_vocab_excludes_reward_ids_inside_the_vocab() -> None:
    logits = torch.zeros(1, 2, 8, requires_grad=True)
    kept = restrict_vocab(logits, 6, excluded_ids=(2, 7))
    assert kept.shape == (1, 2, 6)
    assert torch.all(kept[..., 2] == torch.finfo(kept.dtype).min)
    assert torch.all(torch.softmax(kept, -1)[..., 2] == 0)
    assert torch.allclose(torch.softmax(kept, -1)[..., 0], torch.tensor(1 / 5))
    assert torch.all(logits == 0)  # the input is not modified in place
    # Excluded columns contribute nothing and the loss stays finite.
    _, stats = quark_loss(
        kept, kept.detach(), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), 0.05, 0.06
    )
    assert stats.entropy == pytest.approx(math.log(5), rel=1e-6)
    assert stats.kl == pytest.approx(0.0, abs=1e-6)


# -- reference_kl (the utility KL term) ------------------------------------------------------
def test_reference_kl_is_zero_when_the_logits_are_equal() -> None:
    logits = torch.randn(2, 5, 9, generator=torch.Generator().manual_seed(0))
    loss, stats = reference_kl(logits, logits.clone(), torch.ones(2, 5))
    assert abs(loss.item()) < 1e-6 and abs(stats.kl) < 1e-6
    assert stats.tokens == 10


def test_reference_kl_matches_hand_computation() -> None:
    policy, reference = [0.0, 1.0, 2.0], [2.0, 0.0, -1.0]
    p, q = _softmax(policy), _softmax(reference)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    # Two positions: the hand-computed one and an identical pair (KL 0): the mean halves it.
    loss, stats = reference_kl(
        torch.tensor([[policy, [1.0, 1.0, 1.0]]]),
        torch.tensor([[reference, [1.0, 1.0, 1.0]]]),
        torch.ones(1, 2),
    )
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)
    assert stats.kl == pytest.approx(expected / 2, rel=1e-5) and stats.tokens == 2


def test_reference_kl_ignores_masked_positions() -> None:
    gen = torch.Generator().manual_seed(2)
    policy, reference = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
    loss, stats = reference_kl(policy, reference, mask)
    garbage = policy.clone()
    garbage[mask == 0] = 50.0 * torch.randn(int((mask == 0).sum()), 6, generator=gen)
    assert reference_kl(garbage, reference, mask)[0].item() == pytest.approx(loss.item())
    per_position = token_kl(policy.log_softmax(-1), reference.log_softmax(-1))
    assert stats.kl == pytest.approx(per_position[mask == 1].mean().item(), rel=1e-5)
    assert stats.tokens == 5


def test_reference_kl_moves_only_the_policy() -> None:
    policy = torch.randn(1, 3, 5, requires_grad=True)
    reference = torch.randn(1, 3, 5, requires_grad=True)
    loss, _ = reference_kl(policy, reference, torch.tensor([[0.0, 1.0, 1.0]]))
    loss.backward()
    assert policy.grad is not None and torch.all(policy.grad[0, 0] == 0)
    assert policy.grad[0, 1:].abs().sum() > 0
    assert reference.grad is None


def test_reference_kl_of_an_empty_mask_is_zero_and_shapes_must_match() -> None:
    loss, stats = reference_kl(torch.randn(1, 2, 4), torch.randn(1, 2, 4), torch.zeros(1, 2))
    assert loss.item() == 0.0 and stats.tokens == 0
    with pytest.raises(ValueError, match="shapes differ"):
        reference_kl(torch.zeros(1, 2, 4), torch.zeros(1, 2, 5), torch.ones(1, 2))


def test_quark_loss_reports_no_utility_kl() -> None:
    _, stats = quark_loss(
        torch.zeros(1, 1, 3), torch.zeros(1, 1, 3), torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, 1), 0.05, 0.06,
    )  # fmt: skip
    assert stats.utility_kl == 0.0 and stats.as_dict()["utility_kl"] == 0.0
