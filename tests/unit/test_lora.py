"""LoRA (``lora_rank``): what trains, what is saved, and that a resume continues the run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from quark.config import QuarkConfig
from quark.lora import LoRALinear, adapters_of, merged
from quark.models import QuarkModel, embedding_matrix, frozen_copy, load_model, save_model
from quark.pool import QuantizedSample
from quark.rewards import KeywordShareReward
from quark.training import QuarkTrainer

SAMPLES = [
    QuantizedSample("The cat sat on the", " mat and slept.", 0.9, 0),
    QuantizedSample("Hi", " there, friend", 0.4, 0),
    QuantizedSample("Rain", " falls", 0.0, 4),
]
CONFIG = {"lr": 1e-2, "warmup_steps": 0, "steps": 8, "batch_size": 3, "lora_rank": 4}


def _trainer(qm: QuarkModel, **overrides: object) -> QuarkTrainer:
    config = QuarkConfig(**{**CONFIG, **overrides})  # type: ignore[arg-type]
    return QuarkTrainer(qm, frozen_copy(qm), KeywordShareReward("the"), [], config)


def _logits(qm: QuarkModel) -> torch.Tensor:
    ids = qm.tokenizer("The cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        return qm.model(ids).logits  # [1, T, V]


def test_an_adapter_starts_as_its_layer_and_stands_for_its_delta() -> None:
    base = nn.Linear(6, 5)
    adapter = LoRALinear(copy.deepcopy(base), rank=2, alpha=4.0)
    x = torch.randn(3, 6)
    assert torch.equal(adapter(x), base(x))  # B = 0
    with torch.no_grad():
        adapter.lora_b.normal_()
    expected = nn.functional.linear(x, base.weight + adapter.delta(), base.bias)
    assert torch.allclose(adapter(x), expected, atol=1e-5)


def test_only_adapters_and_the_reward_token_rows_train(tiny_qm: QuarkModel) -> None:
    base_weights = {n: p.detach().clone() for n, p in tiny_qm.model.named_parameters()}
    trainer = _trainer(tiny_qm)
    rows = list(tiny_qm.reward_tokens.ids)  # type: ignore[union-attr]
    embedding_before = embedding_matrix(tiny_qm.model).detach().clone()
    trainer.train_step(SAMPLES)
    for name, adapter in adapters_of(tiny_qm.model):
        assert torch.equal(adapter.base.weight, base_weights[f"{name}.weight"]), name
        assert adapter.lora_b.abs().sum() > 0, name
    embedding = embedding_matrix(tiny_qm.model).detach()
    others = [i for i in range(embedding.shape[0]) if i not in rows]
    assert torch.equal(embedding[others], embedding_before[others])
    assert not torch.equal(embedding[rows[0]], embedding_before[rows[0]])  # the top token
    norms = [p for n, p in tiny_qm.model.named_parameters() if "norm" in n]
    assert norms and not any(p.requires_grad for p in norms)


def test_merged_is_a_plain_model_with_the_same_output_and_restores_it(
    tiny_qm: QuarkModel,
) -> None:
    trainer = _trainer(tiny_qm)
    for _ in range(2):
        trainer.train_step(SAMPLES)
    wrapped = _logits(tiny_qm)
    state = {k: v.clone() for k, v in tiny_qm.model.state_dict().items()}
    with merged(tiny_qm.model):
        assert not adapters_of(tiny_qm.model)
        assert torch.allclose(_logits(tiny_qm), wrapped, atol=1e-4)
    assert len(adapters_of(tiny_qm.model)) == 2 * 7  # every linear of both blocks
    after = tiny_qm.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_a_saved_lora_model_loads_as_a_plain_model(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    trainer = _trainer(tiny_qm)
    trainer.train_step(SAMPLES)
    loaded = load_model(save_model(tiny_qm, tmp_path / "m"), device="cpu")
    assert not adapters_of(loaded.model)
    assert torch.allclose(_logits(loaded), _logits(tiny_qm), atol=1e-4)


def test_a_resumed_lora_run_continues_the_same_steps(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    reference = frozen_copy(tiny_qm)
    trainer = _trainer(tiny_qm)
    for _ in range(2):
        trainer.train_step(SAMPLES)
    trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = QuarkTrainer(
        load_model(tmp_path / "ckpt", device="cpu"),
        reference,
        KeywordShareReward("the"),
        [],
        trainer.config,
    )
    resumed.load_state(tmp_path / "ckpt")
    assert resumed.step == trainer.step
    for _ in range(2):
        ours, theirs = trainer.train_step(SAMPLES), resumed.train_step(SAMPLES)
        assert ours.loss == pytest.approx(theirs.loss, rel=1e-4)
    assert torch.allclose(_logits(resumed.qm), _logits(trainer.qm), atol=1e-4)


def test_lora_refuses_frozen_blocks_and_weight_decay() -> None:
    with pytest.raises(ValueError, match="lora_rank and freeze_layers"):
        QuarkConfig(lora_rank=4, freeze_layers=1)
    with pytest.raises(ValueError, match="weight_decay=0"):
        QuarkConfig(lora_rank=4, weight_decay=0.01)
