"""Offline ACFT (``quark train --objective acft``) from a base model without reward tokens:
its output directory loads again as a token-free model (``quark eval --reward none``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from quark.acft import ACFTConfig
from quark.acft.offline import OfflineRun, train_acft
from quark.models import load_model
from quark.sampling import SamplingParams, generate
from testkit.tiny_model import build_tiny_model

PROMPTS = ["The cat sat on the", "Rain falls on the city and", "Music is", "Hello"]


def _every_other(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    return [float(i % 2) for i in range(len(completions))]  # half accepted, half not


def test_offline_acft_of_a_base_model_loads_without_reward_tokens(
    tmp_path: Path, tokenizer_cache: Path
) -> None:
    qm = build_tiny_model(tokenizer_cache, num_quantiles=None)
    config = ACFTConfig.from_dict(
        {"aux_steps": 2, "aux_batch_size": 4, "steps": 2, "batch_size": 2, "lr": 1e-3,
         "warmup_steps": 1, "response_length": 4, "max_prompt_tokens": 8, "seed": 1}
    )  # fmt: skip
    run = OfflineRun(_every_other, config, SamplingParams(4))
    assert train_acft(qm, PROMPTS, run, tmp_path / "model") == 2

    loaded = load_model(tmp_path / "model", device="cpu")
    assert loaded.reward_tokens is None and loaded.metadata["objective"] == "acft"
    assert loaded.base_vocab_size == qm.base_vocab_size
    for name, param in loaded.model.named_parameters():
        torch.testing.assert_close(param, dict(qm.model.named_parameters())[name])
    greedy = SamplingParams(4, greedy=True)
    ours = [c.text for c in generate(qm, PROMPTS, None, greedy)]
    assert [c.text for c in generate(loaded, PROMPTS, None, greedy)] == ours
