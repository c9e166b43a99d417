"""quark.acft.features: cached base-model features equal a fresh forward, and training on
them gives the same head as training without the cache."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch

from quark.acft import ACFTConfig, ACFTTrainer, AuxTrainer, LabelledSample, base_outputs, new_head
from quark.acft.features import FeatureCache
from quark.acft.training import encode_examples, pair_encoder
from quark.models import QuarkModel, frozen_copy

SAMPLES = [
    LabelledSample("The cat sat on the", " mat and slept.", True),
    LabelledSample("Hi", " there, you fool", False),
    LabelledSample("Rain", "", True),
    LabelledSample("Music is", " loud and nice", True),
    LabelledSample("A long prompt that will be cut at the front", " ok", False),
]
CONFIG = ACFTConfig(aux_lr=1e-2, aux_batch_size=3, response_length=6, max_prompt_tokens=8)


def _cache(qm: QuarkModel, capacity: int) -> tuple[FeatureCache, torch.nn.Module]:
    base = frozen_copy(qm)
    return FeatureCache(base, pair_encoder(qm, CONFIG), capacity), base


def _fresh(qm: QuarkModel, base: torch.nn.Module, samples: Sequence[LabelledSample]) -> tuple:
    batch = encode_examples(qm, samples, CONFIG)
    width = batch.labels.shape[1]
    out = base_outputs(base, batch.input_ids, batch.attention_mask, width)
    return out.hidden, out.logits[:, -width:], batch.label_mask, width


def _pairs(samples: Sequence[LabelledSample]) -> list[tuple[str, str]]:
    return [(s.prompt, s.completion) for s in samples]


@pytest.mark.parametrize("capacity", [0, 2, 100])
def test_cached_features_equal_a_fresh_forward(tiny_qm: QuarkModel, capacity: int) -> None:
    cache, base = _cache(tiny_qm, capacity)
    cache.features(_pairs(SAMPLES[:3]), 6)  # fills the cache (up to its capacity)
    assert len(cache) == min(capacity, 3)
    for batch in (SAMPLES, SAMPLES[::-1], SAMPLES[2:4]):
        hidden, logits, mask, width = _fresh(tiny_qm, base, batch)
        got = cache.features(_pairs(batch), width)
        real = mask.unsqueeze(-1).bool()  # padding positions are not compared
        torch.testing.assert_close(got.hidden * real, hidden * real, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.logits * real, logits * real, atol=1e-4, rtol=1e-4)
    assert len(cache) == min(capacity, len(SAMPLES))


def test_second_epoch_runs_no_forward(tiny_qm: QuarkModel) -> None:
    cache, _ = _cache(tiny_qm, 100)
    cache.features(_pairs(SAMPLES), 6)
    cache.features(_pairs(SAMPLES + SAMPLES[:2]), 6)
    assert (cache.misses, cache.hits) == (len(SAMPLES), len(SAMPLES) + 2)


def test_logits_that_are_not_the_lm_head_turn_the_cache_off(tiny_qm: QuarkModel) -> None:
    """A model whose logits are not lm_head(last hidden state) (e.g. soft-capped) must not
    be trained on recomputed logits: the cache notices and runs the model every time."""
    cache, base = _cache(tiny_qm, 100)
    lm_head = cache._lm_head
    cache._lm_head = lambda hidden: 2.0 * lm_head(hidden)  # type: ignore[method-assign]
    _, logits, _, width = _fresh(tiny_qm, base, SAMPLES)
    got = cache.features(_pairs(SAMPLES), width)
    torch.testing.assert_close(got.logits, logits)
    assert len(cache) == 0 and cache.features(_pairs(SAMPLES), width).logits.equal(logits)


def test_aux_training_is_the_same_with_and_without_the_cache(tiny_qm: QuarkModel) -> None:
    runs = []
    for capacity in (0, 100):
        config = ACFTConfig.from_dict({**CONFIG.to_dict(), "aux_cache_samples": capacity})
        torch.manual_seed(0)  # the same initial head
        trainer = AuxTrainer(tiny_qm, frozen_copy(tiny_qm), new_head(tiny_qm, config), config)
        stats = trainer.fit(SAMPLES, steps=6)  # three epochs of two batches
        runs.append((stats, trainer.head.state_dict(), trainer.features))
    (plain, plain_head, _), (cached, cached_head, cache) = runs
    assert cache.hits > 0
    for a, b in zip(plain, cached, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-5)
    for name, value in plain_head.items():
        torch.testing.assert_close(value, cached_head[name], atol=1e-5, rtol=1e-4)


def test_llm_training_is_the_same_with_and_without_the_cache(tiny_qm: QuarkModel) -> None:
    losses = []
    for capacity in (0, 100):
        qm = copy.deepcopy(tiny_qm)
        config = ACFTConfig.from_dict({**CONFIG.to_dict(), "aux_cache_samples": capacity})
        torch.manual_seed(0)
        head = new_head(qm, config)
        with torch.no_grad():  # an R that differs from token to token, so q != p
            head.up.bias.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(0))
        trainer = ACFTTrainer(qm, frozen_copy(qm), head, config)
        losses.append([s.loss for s in trainer.fit(SAMPLES, steps=4)])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
