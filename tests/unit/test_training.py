"""quark.training: one step's invariants, checkpoint/resume, and that Quark actually learns."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from quark.checkpoint import OPTIMIZER_FILE, STATE_FILE
from quark.config import QuarkConfig
from quark.models import QuarkModel, frozen_copy, load_model
from quark.pool import PoolRecord, QuantizedSample
from quark.rewards import KeywordShareReward
from quark.sampling import SamplingParams, generate
from quark.schedule import TimeBudget
from quark.training import POOL_FILE, QuarkTrainer, read_pool
from testkit.clock import FakeClock
from testkit.tiny_model import build_tiny_model

LogitBias = Callable[..., AbstractContextManager[None]]

PROMPTS = [
    "The cat sat on the",
    "Hi",
    "A long prompt about rivers, trees and the city at night",
    "Rain",
    "Music is",
    "She opened the door and",
    "My favourite food is",
    "Yesterday we went to",
]

SAMPLES = [
    QuantizedSample("The cat sat on the", " mat and slept.", 0.9, 0),
    QuantizedSample("Hi", " there, friend", 0.4, 2),
    QuantizedSample("Rain", "", 0.0, 4),
    QuantizedSample("Music is", " loud", 0.1, 3),
]


def _config(**overrides: object) -> QuarkConfig:
    values: dict[str, object] = {
        "lr": 1e-3,
        "warmup_steps": 2,
        "steps": 10,
        "batch_size": 4,
        "explore_prompts": 8,
        "response_length": 5,
        "sample_interval": 2,
        "generation_batch_size": 8,
        "seed": 3,
    }
    return QuarkConfig(**{**values, **overrides})  # type: ignore[arg-type]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _trainer(qm: QuarkModel, config: QuarkConfig, metrics: Path) -> QuarkTrainer:
    return QuarkTrainer(
        qm, frozen_copy(qm), KeywordShareReward("the"), PROMPTS, config, metrics_path=metrics
    )


def test_trainer_requires_matching_reward_tokens(tiny_qm: QuarkModel) -> None:
    with pytest.raises(ValueError, match="reward tokens"):
        QuarkTrainer(
            tiny_qm,
            frozen_copy(tiny_qm),
            KeywordShareReward("x"),
            PROMPTS,
            _config(num_quantiles=3),
        )


def test_train_step_changes_the_policy_but_not_the_reference(tiny_qm: QuarkModel) -> None:
    reference = frozen_copy(tiny_qm)
    trainer = QuarkTrainer(tiny_qm, reference, KeywordShareReward("the"), PROMPTS, _config())
    policy_before, reference_before = _snapshot(tiny_qm.model), _snapshot(reference)

    stats = trainer.train_step(SAMPLES)

    assert trainer.step == 1
    assert stats.tokens > 0 and torch.isfinite(torch.tensor(stats.loss))
    for name, before in policy_before.items():
        assert not torch.equal(before, dict(tiny_qm.model.named_parameters())[name]), name
    for name, before in reference_before.items():
        assert torch.equal(before, dict(reference.named_parameters())[name]), name
    assert all(not p.requires_grad and p.grad is None for p in reference.parameters())
    assert not tiny_qm.model.training  # back in eval mode for sampling


def test_train_step_on_empty_completions_of_one_token_prompts(tiny_qm: QuarkModel) -> None:
    """Regression: a batch with nothing to learn used to raise 'logit shapes differ'."""
    trainer = QuarkTrainer(
        tiny_qm, frozen_copy(tiny_qm), KeywordShareReward("the"), PROMPTS, _config()
    )
    stats = trainer.train_step([QuantizedSample("Hi", "", 0.0, 0)])
    assert stats.tokens == 0 and stats.loss == 0.0
    assert trainer.step == 1


def test_run_explores_then_trains(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    trainer = _trainer(tiny_qm, _config(), metrics)
    trainer.run(3, progress=False)
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    explores = [(e["step"], e["quantile"]) for e in events if e["event"] == "explore"]
    assert explores == [(0, None), (2, 0)]  # the original behaviour first, then the top token
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3]
    assert len(trainer.pool) == 16
    records = trainer.pool.records()
    assert [r.metadata["quantile"] for r in records] == [None] * 8 + [0] * 8


@pytest.mark.parametrize("decay_lr", [False, True])
def test_run_stops_at_its_time_budget_and_decays_lr_to_it(
    tiny_qm: QuarkModel, tmp_path: Path, decay_lr: bool
) -> None:
    """A 10 s budget on a clock read once per check and per lr update: it runs out long
    before the 10_000 steps, and only ``decay_lr`` brings the rate down with it."""
    metrics = tmp_path / "metrics.jsonl"
    config = _config(steps=10_000, warmup_steps=0, lr=1e-3)
    trainer = _trainer(tiny_qm, config, metrics)
    budget = TimeBudget(10.0, decay_lr=decay_lr, clock=FakeClock(tick=0.5))
    trainer.run(10_000, budget=budget)
    lrs = [e["lr"] for e in map(json.loads, metrics.read_text().splitlines()) if "lr" in e]
    assert 3 <= trainer.step <= 20 and budget.expired()
    if decay_lr:
        assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3 and lrs[-1] < 1e-4
    else:
        assert min(lrs) > 0.99e-3
    trainer.run(1)  # no budget: the step schedule alone again
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["lr"] > 0.99e-3


@pytest.mark.parametrize(("round_epochs", "explore_steps"), [(0, [0]), (1, [0, 2, 6]), (2, [0, 4])])
def test_round_epochs_explores_once_a_round_has_made_its_passes(
    tiny_qm: QuarkModel, tmp_path: Path, round_epochs: int, explore_steps: list[int]
) -> None:
    """8 samples per round, all trained, 4 per batch: a pass over round 1's pool takes two
    steps, over round 2's (16 samples) four. sample_interval 100 never falls due here."""
    metrics = tmp_path / "metrics.jsonl"
    config = _config(sample_interval=100, train_quantiles="all", round_epochs=round_epochs)
    trainer = _trainer(tiny_qm, config, metrics)
    trainer.run(7, progress=False)
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "explore"] == explore_steps
    assert trainer.step == 7


def test_checkpoint_round_trip_and_resume(
    tiny_qm: QuarkModel, tokenizer_cache: Path, tmp_path: Path
) -> None:
    reward = KeywordShareReward("the")
    config = _config()
    trainer = QuarkTrainer(tiny_qm, frozen_copy(tiny_qm), reward, PROMPTS, config)
    trainer.run(3, progress=False)
    out = trainer.save_checkpoint(tmp_path / "ckpt")

    names = sorted(p.name for p in out.iterdir())
    assert {OPTIMIZER_FILE, STATE_FILE, POOL_FILE, "model.safetensors", "quark.json"} <= set(names)
    for name in names:
        assert name.endswith((".safetensors", ".json", ".jsonl", ".jinja", ".txt")), name
        assert not name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")), name

    restored_qm = load_model(out, device="cpu")
    original = build_tiny_model(tokenizer_cache)  # what a run would load as its reference
    restored = QuarkTrainer(restored_qm, frozen_copy(original), reward, PROMPTS, config)
    restored.load_state(out)

    assert restored.step == trainer.step == 3
    assert restored_qm.metadata["step"] == 3
    assert len(restored.pool) == len(trainer.pool) == 16
    assert [(r.record_id, r.prompt, r.completion, r.reward) for r in restored.pool.records()] == [
        (r.record_id, r.prompt, r.completion, r.reward) for r in trainer.pool.records()
    ]
    assert restored.scheduler.state_dict() == trainer.scheduler.state_dict()
    assert restored.scheduler.get_last_lr() == trainer.scheduler.get_last_lr()
    assert restored.rng.getstate() == trainer.rng.getstate()
    saved, loaded = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    assert saved["param_groups"][0]["lr"] == loaded["param_groups"][0]["lr"]
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for index, state in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], loaded["state"][index][key]), (index, key)
        assert float(state["step"]) == float(loaded["state"][index]["step"]) == 3.0

    # Resuming is exact: the next step on the same batch lands on the same weights.
    first, second = trainer.train_step(SAMPLES), restored.train_step(SAMPLES)
    assert first.loss == pytest.approx(second.loss, abs=1e-6)
    after = dict(restored_qm.model.named_parameters())
    for name, param in tiny_qm.model.named_parameters():
        torch.testing.assert_close(param, after[name], atol=1e-6, rtol=0)


# -- the learning test -------------------------------------------------------------------------
LEARN_SEED = 0
KEYWORD = "banana"
# log-odds bonus giving " banana" ~10% of the mass of the untrained model (vocab 49152).
KEYWORD_PRIOR = 8.6


def _learn_prompts() -> list[str]:
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "sun",
        "rain",
        "house",
        "tree",
        "river",
        "city",
        "music",
        "book",
        "garden",
        "light",
        "road",
        "water",
    ]
    rng = random.Random(0)
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))).capitalize()
        for _ in range(32)
    ]


def _mean_reward(qm: QuarkModel, prompts: list[str], quantile: int | None, length: int) -> float:
    texts = [c.text for c in generate(qm, prompts, quantile, SamplingParams(length), seed=1234)]
    rewards = KeywordShareReward(KEYWORD)(prompts, texts)
    return sum(rewards) / len(rewards)


def test_quark_learns_to_condition_on_the_reward_token(
    tokenizer_cache: Path, logit_bias: LogitBias
) -> None:
    """Completions after the top reward token earn clearly more reward than after the bottom one.

    A randomly initialised model emits a given word with probability ~1/49152, so no sample
    would ever score. A fixed logit bonus (a hook, not a parameter; on the policy and the
    reference alike, whatever the reward token) makes " banana" a ~10% word before training; the
    reward tokens are then the only thing that can tell top from bottom. Measured on 2 busy
    shared cores: ~20 s. Seeds 0-5 all pass: after training top - bottom = 0.19-0.23 and
    top - untrained = 0.14-0.19; before training |top - bottom| <= 0.02.
    """
    qm = build_tiny_model(tokenizer_cache, hidden_size=64, seed=LEARN_SEED)
    keyword_ids = qm.tokenizer(" " + KEYWORD, add_special_tokens=False)["input_ids"]
    assert len(keyword_ids) == 1
    reference = frozen_copy(qm)
    prompts = _learn_prompts()
    evaluation = prompts * 2  # 64 samples per condition, fixed seed
    config = QuarkConfig(
        lr=3e-3,
        warmup_steps=5,
        steps=80,
        batch_size=8,
        sample_interval=20,
        explore_prompts=32,
        response_length=6,
        max_prompt_tokens=16,
        generation_batch_size=64,
        seed=LEARN_SEED,
        train_quantiles="all",  # the bottom token must learn too
    )  # kl_coef and entropy_coef keep the paper's values
    bottom = config.num_quantiles - 1
    length = config.response_length

    with logit_bias([qm.model, reference], {keyword_ids[0]: KEYWORD_PRIOR}):
        untrained = _mean_reward(qm, evaluation, None, length)
        top_before = _mean_reward(qm, evaluation, 0, length)
        bottom_before = _mean_reward(qm, evaluation, bottom, length)
        # The prior makes the keyword common, but the reward tokens mean nothing yet.
        assert 0.04 < untrained < 0.2
        assert abs(top_before - bottom_before) < 0.04

        trainer = QuarkTrainer(qm, reference, KeywordShareReward(KEYWORD), prompts, config)
        trainer.run(config.steps, progress=False)

        top_after = _mean_reward(qm, evaluation, 0, length)
        bottom_after = _mean_reward(qm, evaluation, bottom, length)

    summary = (
        f"untrained={untrained:.3f} before: top={top_before:.3f} bottom={bottom_before:.3f}; "
        f"after: top={top_after:.3f} bottom={bottom_after:.3f}"
    )
    assert top_after > bottom_after + 0.1, summary
    assert top_after > untrained + 0.08, summary
    assert top_after > top_before + 0.08, summary


def test_read_pool_keeps_a_completion_holding_unicode_line_separators(tmp_path: Path) -> None:
    # to_json leaves U+2028 / U+0085 raw; a checkpoint's pool must still read back record by
    # record (str.splitlines would cut this one in two and fail to parse it).
    records = [PoolRecord("p", "a\u2028b\x85c", 0.5, {}), PoolRecord("q", "d", None, {})]
    (tmp_path / POOL_FILE).write_text(
        "".join(r.to_json() + "\n" for r in records), encoding="utf-8"
    )
    assert read_pool(tmp_path) == records
