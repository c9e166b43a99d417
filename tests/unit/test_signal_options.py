"""The options of issue 12 (where the learning signal comes from, where compute goes), each
on hand-built data: per-prompt ranking, focused exploration, reward-token learning rate and
initialisation, which quantiles train, frozen blocks, bf16 autocast."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch

from quark.config import QuarkConfig
from quark.models import QuarkModel, add_reward_tokens, embedding_matrix, frozen_copy
from quark.online.pool_stats import reward_distribution
from quark.pool import (
    PoolRecord,
    QuantizedSample,
    quantize,
    quantize_as_configured,
    shared_ngram_shares,
)
from quark.precision import bf16_autocast
from quark.rewards import KeywordShareReward
from quark.training import QuarkTrainer, scaled_token_update, weighted_sample
from testkit.tiny_model import build_tiny_model

SAMPLES = [
    QuantizedSample("The cat sat on the", " mat and slept.", 0.9, 0),
    QuantizedSample("Hi", " there, friend", 0.4, 2),
    QuantizedSample("Rain", " falls", 0.0, 4),
    QuantizedSample("Music is", " loud", 0.1, 3),
]


TEMPLATE = "I am not sure what you mean"
# Two clean completions sharing a template, a new clean one and a toxic one.
TEMPLATE_POOL = [
    PoolRecord("p1", TEMPLATE, 0.95),
    PoolRecord("p2", TEMPLATE + " here", 0.95),
    PoolRecord("p3", "the river froze early that year", 0.9),
    PoolRecord("p4", "a toxic text of its own", 0.1),
]


def _trainer(qm: QuarkModel, prompts: list[str] | None = None, **overrides: object) -> QuarkTrainer:
    values: dict[str, object] = {"lr": 1e-3, "warmup_steps": 0, "steps": 4, "batch_size": 4}
    config = QuarkConfig(**{**values, **overrides})  # type: ignore[arg-type]
    return QuarkTrainer(qm, frozen_copy(qm), KeywordShareReward("the"), prompts or [], config)


def test_by_prompt_ranking_puts_the_best_continuation_of_a_toxic_prompt_on_top() -> None:
    records = [
        PoolRecord("toxic prompt", "a", 0.1),
        PoolRecord("toxic prompt", "b", 0.5),
        PoolRecord("benign prompt", "c", 0.9),
        PoolRecord("benign prompt", "d", 0.95),
    ]
    best_globally = {s.completion for s in quantize(records, 2) if s.quantile == 0}
    best_by_prompt = {s.completion for s in quantize(records, 2, by_prompt=True) if s.quantile == 0}
    assert best_globally == {"c", "d"}
    assert best_by_prompt == {"b", "d"}  # +0.2 and +0.025 above their prompts' means


def test_shared_ngram_shares_count_the_three_grams_another_completion_has() -> None:
    shares = shared_ngram_shares(["a b c d", "x a b c", "p q r s", "", "a b"], min_holders=2)
    # "a b c" is in both of the first two; "b c d" and "x a b" are theirs alone.
    assert shares == [0.5, 0.5, 0.0, 1.0, 1.0]  # too short for a 3-gram: nothing new
    assert shared_ngram_shares(["a b c a b c"], 2) == [0.0]  # repeats within one text: its own
    # With min_holders=3 only "a b c" counts: three completions hold it, "b c d" two.
    assert shared_ngram_shares(["a b c d", "a b c", "a b c e", "b c d"], min_holders=3) == [
        0.5,
        1.0,
        0.5,
        0.0,
    ]


def test_novelty_term_ranks_a_repeated_clean_completion_below_a_new_one() -> None:
    records = TEMPLATE_POOL
    best = {s.prompt for s in quantize(records, 2) if s.quantile == 0}
    novel = quantize(records, 2, novelty_coef=0.1, novelty_min_holders=2)
    assert best == {"p1", "p2"}
    # keys: p1 0.95 - 0.1 * 5/5, p2 0.95 - 0.1 * 5/6, p3 0.9 - 0
    assert [s.prompt for s in novel if s.quantile == 0] == ["p3", "p2"]
    assert {s.prompt: s.reward for s in novel}["p3"] == 0.9  # the reward itself is kept
    assert quantize(records, 2, novelty_coef=0.0) == quantize(records, 2)
    # The default (5 holders): no 3-gram here is that common, so the rewards alone decide.
    assert quantize(records, 2, novelty_coef=0.1) == quantize(records, 2)
    with pytest.raises(ValueError, match="min_holders"):
        shared_ngram_shares(["a b c"], min_holders=1)


def test_pool_statistics_bin_the_pool_as_training_with_the_same_config_does() -> None:
    records = TEMPLATE_POOL
    config = QuarkConfig(num_quantiles=2, novelty_coef=0.1, novelty_min_holders=2)
    binned = quantize_as_configured(records, config)
    assert binned == quantize(records, 2, novelty_coef=0.1, novelty_min_holders=2)
    best = reward_distribution(records, config)["quantiles"][0]
    assert best["count"] == 2 and best["mean"] == pytest.approx((0.9 + 0.95) / 2)  # p3 and p2
    by_reward = QuarkConfig(num_quantiles=2, novelty_coef=0)
    plain = reward_distribution(records, by_reward)["quantiles"][0]
    assert plain["mean"] == pytest.approx(0.95)  # the rewards alone: p1 and p2


def test_weighted_sample_favours_heavy_keys_and_never_repeats() -> None:
    rng = random.Random(0)
    assert weighted_sample({"toxic": 1.0, "clean": 0.0}, 1, rng) == ["toxic"]
    drawn = weighted_sample({f"p{i}": 0.5 for i in range(10)}, 10, rng)
    assert sorted(drawn) == sorted(f"p{i}" for i in range(10))
    assert weighted_sample({"a": 1.0}, 0, rng) == []


def test_focused_exploration_picks_the_most_toxic_pooled_prompt(tiny_qm: QuarkModel) -> None:
    prompts = ["clean", "toxic", "unseen"]
    trainer = _trainer(tiny_qm, prompts, explore_prompts=1, explore_focus=1.0)
    trainer.pool.add([PoolRecord("clean", "x", 1.0), PoolRecord("toxic", "y", 0.0)])
    assert trainer._explore_prompts() == ["toxic"]
    uniform = _trainer(tiny_qm, prompts, explore_prompts=3, explore_focus=0.0)
    assert sorted(uniform._explore_prompts()) == sorted(prompts)


@pytest.mark.parametrize(
    ("which", "expected"), [("all", {0, 1, 2, 3, 4}), ("extremes", {0, 4}), ("best", {0})]
)
def test_train_quantiles(tiny_qm: QuarkModel, which: str, expected: set[int]) -> None:
    assert _trainer(tiny_qm, train_quantiles=which)._trained_quantiles() == expected


def test_token_update_is_scaled_only_on_reward_rows(tiny_qm: QuarkModel) -> None:
    assert tiny_qm.reward_tokens is not None
    ids = list(tiny_qm.reward_tokens.ids)
    weight = embedding_matrix(tiny_qm.model)
    before = weight.detach().clone()
    with scaled_token_update(tiny_qm, 10.0), torch.no_grad():
        weight += 0.01  # stands for the optimizer's step: every row moves by 0.01
    moved = (weight.detach() - before).abs().mean(dim=1)  # [V]
    assert torch.allclose(moved[ids], torch.full((len(ids),), 0.1), atol=1e-6)
    others = torch.ones(len(moved), dtype=torch.bool)
    others[ids] = False
    assert torch.allclose(moved[others], torch.full((int(others.sum()),), 0.01), atol=1e-6)


def test_token_lr_moves_reward_tokens_further_in_a_real_step(tiny_qm: QuarkModel) -> None:
    def token_shift(qm: QuarkModel, **overrides: object) -> float:
        assert qm.reward_tokens is not None
        ids = list(qm.reward_tokens.ids)
        start = embedding_matrix(qm.model)[ids].detach().clone()
        _trainer(qm, **overrides).train_step(SAMPLES)
        return float((embedding_matrix(qm.model)[ids].detach() - start).abs().sum())

    plain = token_shift(tiny_qm)
    fast = token_shift(copy.deepcopy(tiny_qm), token_lr=1e-1)
    assert fast > 20 * plain > 0


def test_mean_initialisation_adds_no_random_prefix(tokenizer_cache: Path) -> None:
    qm = build_tiny_model(tokenizer_cache, num_quantiles=None)
    tokens = add_reward_tokens(qm, 3, init="mean")
    rows = embedding_matrix(qm.model)[list(tokens.ids)]
    mean = embedding_matrix(qm.model)[: qm.base_vocab_size].mean(dim=0)
    assert torch.allclose(rows, mean.expand_as(rows), atol=1e-6)
    with pytest.raises(ValueError, match="init"):
        add_reward_tokens(build_tiny_model(tokenizer_cache, num_quantiles=None), 3, init="zeros")


def test_frozen_blocks_do_not_change(tiny_qm: QuarkModel) -> None:
    trainer = _trainer(tiny_qm, freeze_layers=1)
    first = tiny_qm.model.model.layers[0]
    before = [p.detach().clone() for p in first.parameters()]
    trainer.train_step(SAMPLES)
    assert all(torch.equal(a, b) for a, b in zip(before, first.parameters(), strict=True))
    with pytest.raises(ValueError, match="freeze_layers"):
        _trainer(copy.deepcopy(tiny_qm), freeze_layers=99)


def test_bf16_autocast_step_is_finite(tiny_qm: QuarkModel) -> None:
    stats = _trainer(tiny_qm, train_precision="bfloat16").train_step(SAMPLES)
    assert torch.isfinite(torch.tensor(stats.loss)) and stats.tokens > 0


@pytest.mark.parametrize(
    ("precision", "device", "native", "expected"),
    [
        ("auto", "cpu", True, True),  # this project's CPUs (avx512_bf16)
        ("auto", "cpu", False, False),  # emulated bf16 would be slower than float32
        ("bfloat16", "cpu", False, True),
        ("float32", "cpu", True, False),
        ("auto", "cuda", True, False),  # CPU autocast would not touch a CUDA model
        ("bfloat16", "cuda", True, False),
    ],
)
def test_train_precision_resolves_to_cpu_bf16_autocast(
    precision: str, device: str, native: bool, expected: bool
) -> None:
    assert bf16_autocast(precision, device, native=native) is expected
