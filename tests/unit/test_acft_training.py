"""quark.acft's head and trainers on the tiny model: where gradients go, save/load, resume."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch

from quark.acft import (
    ACFTConfig,
    ACFTTrainer,
    AuxHead,
    AuxTrainer,
    Example,
    LabelledSample,
    base_outputs,
    encode_examples,
    head_parameters,
    label_records,
    load_head,
    new_head,
    q_logprobs,
    sample_labelled,
    save_head,
)
from quark.acft.loss import guidance_kl
from quark.acft.training import HEAD_DIR
from quark.checkpoint import OPTIMIZER_FILE, STATE_FILE
from quark.models import QuarkModel, embedding_matrix, frozen_copy, load_model
from quark.pool import PoolRecord
from quark.sampling import SamplingParams

SAMPLES = [
    LabelledSample("The cat sat on the", " mat and slept.", True),
    LabelledSample("Hi", " there, you fool", False),
    LabelledSample("Rain", "", True),
    LabelledSample("Music is", " loud and nice", True),
]


def _config(**overrides: object) -> ACFTConfig:
    values: dict[str, Any] = {
        "aux_lr": 1e-2,
        "aux_steps": 4,
        "aux_batch_size": 4,
        "lr": 1e-3,
        "steps": 4,
        "batch_size": 4,
        "warmup_steps": 1,
        "response_length": 6,
        "max_prompt_tokens": 8,
        "seed": 3,
    }
    return ACFTConfig.from_dict({**values, **overrides})


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


# -- config ---------------------------------------------------------------------------------
def test_config_fields_have_help_and_bounds_are_enforced() -> None:
    assert all(f.metadata.get("help") for f in fields(ACFTConfig))
    for bad in ({"kl_coef": -1.0}, {"aux_rank": 0}, {"aux_lr": 0.0}, {"consistency_coef": -0.1}):
        with pytest.raises(ValueError, match="invalid ACFTConfig"):
            ACFTConfig.from_dict(bad)
    assert ACFTConfig.from_dict(ACFTConfig().to_dict()) == ACFTConfig()


def test_label_records_thresholds_and_skips_unscored() -> None:
    records = [
        PoolRecord("a", "x", 0.9),
        PoolRecord("b", "y", 0.5),
        PoolRecord("c", "z", 0.1),
        PoolRecord("d", "w", None),
    ]
    labelled = label_records(records, threshold=0.5)
    assert [(s.prompt, s.satisfied) for s in labelled] == [("a", True), ("b", True), ("c", False)]


def test_sample_labelled_labels_each_sample_with_the_oracle(tiny_qm: QuarkModel) -> None:
    def oracle(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [float(len(c) % 2) for c in completions]

    prompts = ["The cat", "Hi", "Rain", "Music"]
    samples = sample_labelled(
        tiny_qm, prompts, oracle, _config(), SamplingParams(4), seed=1, batch_size=2
    )
    assert [s.prompt for s in samples] == prompts
    assert all(s.satisfied == (len(s.completion) % 2 == 1) for s in samples)


# -- the head -------------------------------------------------------------------------------
def test_head_size_and_an_untrained_head_leaves_q_equal_to_the_base(tiny_qm: QuarkModel) -> None:
    config = _config(aux_rank=8)
    head = new_head(tiny_qm, config)
    hidden = tiny_qm.model.config.hidden_size
    assert sum(p.numel() for p in head.parameters()) == head_parameters(
        hidden, tiny_qm.base_vocab_size, 8
    )
    batch = encode_examples(tiny_qm, SAMPLES, config)
    trainer = ACFTTrainer(tiny_qm, frozen_copy(tiny_qm), head, config)
    target, base_logprobs = trainer.target(batch, SAMPLES)
    assert target.shape == (4, batch.labels.shape[1], tiny_qm.base_vocab_size)
    torch.testing.assert_close(target, base_logprobs, atol=1e-5, rtol=0)
    assert guidance_kl(target, base_logprobs, batch.label_mask) < 1e-6


def test_base_outputs_hidden_states_feed_the_lm_head(tiny_qm: QuarkModel) -> None:
    batch = encode_examples(tiny_qm, SAMPLES, _config())
    width = batch.labels.shape[1]
    out = base_outputs(tiny_qm.model, batch.input_ids, batch.attention_mask, width)
    head = tiny_qm.model.get_output_embeddings()
    torch.testing.assert_close(head(out.hidden), out.logits, atol=1e-5, rtol=1e-5)
    assert out.hidden.shape == (4, width, tiny_qm.model.config.hidden_size)


def test_head_saves_and_loads_as_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = AuxHead(16, 50, rank=4)
    for p in head.parameters():
        torch.nn.init.normal_(p)
    save_head(head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == [
        "aux_head.json",
        "aux_head.safetensors",
    ]
    loaded = load_head(tmp_path / "head")
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(loaded(x), head(x))
    assert (loaded.hidden_size, loaded.vocab_size, loaded.rank) == (16, 50, 4)


# -- where gradients go -----------------------------------------------------------------------
def test_aux_step_trains_only_the_head(tiny_qm: QuarkModel) -> None:
    config = _config()
    base = frozen_copy(tiny_qm)
    head = new_head(tiny_qm, config)
    policy_before, base_before, head_before = (
        _snapshot(tiny_qm.model),
        _snapshot(base),
        _snapshot(head),
    )
    trainer = AuxTrainer(tiny_qm, base, head, config)
    stats = trainer.train_step(SAMPLES)
    assert stats.tokens > 0 and stats.loss == pytest.approx(stats.bce + stats.consistency)
    assert _changed(head_before, head) >= {"up.weight", "up.bias"}
    assert not _changed(base_before, base)
    assert not _changed(policy_before, tiny_qm.model)
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is None for p in tiny_qm.model.parameters())


def test_llm_step_trains_only_the_policy(tiny_qm: QuarkModel) -> None:
    config = _config()
    base = frozen_copy(tiny_qm)
    head = new_head(tiny_qm, config)
    with torch.no_grad():  # a head whose R differs from token to token: q != p
        head.up.bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
    policy_before, base_before, head_before = (
        _snapshot(tiny_qm.model),
        _snapshot(base),
        _snapshot(head),
    )
    trainer = ACFTTrainer(tiny_qm, base, head, config)
    stats = trainer.train_step(SAMPLES)
    assert stats.kl > 0.1  # the head moved q away from the (still equal) base
    assert stats.loss == pytest.approx(stats.nll + config.kl_coef * stats.kl, rel=1e-5)
    assert _changed(policy_before, tiny_qm.model)
    assert not _changed(base_before, base)
    assert not _changed(head_before, head)
    assert all(p.grad is None for p in head.parameters())
    assert all(p.grad is None for p in base.parameters())


def test_llm_step_follows_train_precision(tiny_qm: QuarkModel) -> None:
    """bfloat16 autocasts the policy's forward (the loss differs from float32's by bf16
    rounding, no more); float32 gives the float32 loss."""
    losses = {}
    for precision in ("float32", "bfloat16"):
        config = _config(train_precision=precision)
        qm = copy.deepcopy(tiny_qm)
        trainer = ACFTTrainer(qm, frozen_copy(qm), new_head(qm, config), config)
        losses[precision] = trainer.train_step(SAMPLES).loss
    assert losses["bfloat16"] != losses["float32"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)


def test_llm_step_with_reward_tokens_uses_the_original_vocabulary(tiny_qm: QuarkModel) -> None:
    """The tiny model carries 5 Quark reward tokens past its original vocabulary: ACFT
    compares distributions over the original vocabulary only."""
    assert tiny_qm.reward_tokens is not None
    assert embedding_matrix(tiny_qm.model).shape[0] > tiny_qm.base_vocab_size
    config = _config()
    trainer = ACFTTrainer(tiny_qm, frozen_copy(tiny_qm), new_head(tiny_qm, config), config)
    batch = encode_examples(tiny_qm, SAMPLES, config)
    target, _ = trainer.target(batch, SAMPLES)
    assert target.shape[-1] == tiny_qm.base_vocab_size
    torch.testing.assert_close(
        q_logprobs(target, torch.zeros_like(target)).exp().sum(-1), torch.ones(target.shape[:2])
    )


def test_head_vocabulary_must_match(tiny_qm: QuarkModel) -> None:
    with pytest.raises(ValueError, match="head vocab"):
        AuxTrainer(tiny_qm, frozen_copy(tiny_qm), AuxHead(64, 10), _config())


# -- checkpoints ----------------------------------------------------------------------------
def test_aux_checkpoint_resumes_exactly(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    config = _config()
    base = frozen_copy(tiny_qm)
    trainer = AuxTrainer(tiny_qm, base, new_head(tiny_qm, config), config)
    trainer.fit(SAMPLES, steps=2)
    out = trainer.save_checkpoint(tmp_path / "aux")
    assert {OPTIMIZER_FILE, STATE_FILE, "aux_head.safetensors"} <= {p.name for p in out.iterdir()}

    restored = AuxTrainer(tiny_qm, base, load_head(out), config)
    restored.load_state(out)
    assert restored.step == 2
    first, second = trainer.train_step(SAMPLES), restored.train_step(SAMPLES)
    assert first.loss == pytest.approx(second.loss, abs=1e-6)
    after = restored.head.state_dict()
    for name, value in trainer.head.state_dict().items():
        torch.testing.assert_close(value, after[name], atol=1e-6, rtol=0)


def test_acft_checkpoint_resumes_exactly(
    tiny_qm: QuarkModel, tmp_path: Path, tokenizer_cache: Path
) -> None:
    config = _config()
    base = frozen_copy(tiny_qm)
    head = new_head(tiny_qm, config)
    AuxTrainer(tiny_qm, base, head, config).train_step(SAMPLES)
    trainer = ACFTTrainer(tiny_qm, base, head, config)
    trainer.fit(SAMPLES, steps=2)
    out = trainer.save_checkpoint(tmp_path / "acft")
    assert (out / HEAD_DIR / "aux_head.safetensors").exists()

    restored_qm = load_model(out, device="cpu")
    restored = ACFTTrainer(restored_qm, base, ACFTTrainer.saved_head(out), config)
    restored.load_state(out)
    assert restored.step == 2
    first, second = trainer.train_step(SAMPLES), restored.train_step(SAMPLES)
    assert first.loss == pytest.approx(second.loss, abs=1e-5)
    after = dict(restored_qm.model.named_parameters())
    for name, param in tiny_qm.model.named_parameters():
        torch.testing.assert_close(param, after[name], atol=1e-5, rtol=0)


def test_fit_walks_shuffled_epochs(tiny_qm: QuarkModel) -> None:
    config = _config(batch_size=3)
    trainer = ACFTTrainer(tiny_qm, frozen_copy(tiny_qm), new_head(tiny_qm, config), config)
    stats = trainer.fit([Example(s.prompt, s.completion) for s in SAMPLES], steps=2)
    assert trainer.step == 2 and len(stats) == 2
    with pytest.raises(ValueError, match="empty"):
        trainer.fit([], steps=1)
