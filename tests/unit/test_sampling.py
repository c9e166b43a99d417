"""quark.sampling.generate on the tiny model: batching, seeds, suppression, finish reasons."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from quark.models import QuarkModel
from quark.sampling import Completion, SamplingParams, _split_completion, eos_ids, generate

LogitBias = Callable[..., AbstractContextManager[None]]

PROMPTS = [
    "The cat sat on the",
    "Hi",
    "A much longer prompt about rivers, trees and the city at night",
    "Rain",
    "Music is",
]


def test_one_completion_per_prompt(tiny_qm: QuarkModel) -> None:
    params = SamplingParams(max_new_tokens=6)
    completions = generate(tiny_qm, PROMPTS, 0, params, batch_size=2, seed=0)
    assert len(completions) == len(PROMPTS)
    for completion in completions:
        assert completion.finish_reason in ("stop", "length")
        assert 0 < len(completion.token_ids) <= 6 or completion.finish_reason == "stop"
        assert completion.text == tiny_qm.tokenizer.decode(
            list(completion.token_ids), skip_special_tokens=True
        )


def test_same_seed_same_output(tiny_qm: QuarkModel) -> None:
    params = SamplingParams(max_new_tokens=6)
    first = generate(tiny_qm, PROMPTS, 2, params, batch_size=3, seed=7)
    torch.manual_seed(12345)  # the global RNG state in between must not matter
    second = generate(tiny_qm, PROMPTS, 2, params, batch_size=3, seed=7)
    other = generate(tiny_qm, PROMPTS, 2, params, batch_size=3, seed=8)
    assert first == second
    assert [c.token_ids for c in first] != [c.token_ids for c in other]


def test_reward_tokens_are_never_generated(tiny_qm: QuarkModel, logit_bias: LogitBias) -> None:
    reward_ids = set(tiny_qm.reward_tokens.ids)
    with logit_bias(tiny_qm.model, dict.fromkeys(reward_ids, 50.0)):
        # The bias works: without suppression the next token would be a reward token.
        ids = tiny_qm.tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert int(tiny_qm.model(input_ids=ids).logits[0, -1].argmax()) in reward_ids
        for params in (SamplingParams(8), SamplingParams(8, greedy=True)):
            for quantile in (0, None):
                for completion in generate(tiny_qm, PROMPTS, quantile, params, seed=1):
                    assert reward_ids.isdisjoint(completion.token_ids)
                    assert len(completion.token_ids) == 8 or completion.finish_reason == "stop"


def test_finish_reason_stop_when_eos_is_forced(tiny_qm: QuarkModel, logit_bias: LogitBias) -> None:
    stops = eos_ids(tiny_qm)
    assert tiny_qm.tokenizer.eos_token_id in stops
    with logit_bias(tiny_qm.model, {tiny_qm.tokenizer.eos_token_id: 1e4}):
        for params in (SamplingParams(8), SamplingParams(8, greedy=True)):
            for completion in generate(tiny_qm, PROMPTS, 0, params, seed=0):
                assert completion.finish_reason == "stop"
                assert completion.token_ids == ()
                assert completion.text == ""


def test_finish_reason_length_when_eos_is_impossible(
    tiny_qm: QuarkModel, logit_bias: LogitBias
) -> None:
    with logit_bias(tiny_qm.model, dict.fromkeys(eos_ids(tiny_qm), -1e4)):
        for completion in generate(tiny_qm, PROMPTS, 4, SamplingParams(5), seed=0):
            assert completion.finish_reason == "length"
            assert len(completion.token_ids) == 5


def test_eos_in_the_middle_cuts_the_completion(tiny_qm: QuarkModel) -> None:
    eos = tiny_qm.tokenizer.eos_token_id
    hello, world = tiny_qm.tokenizer(" hello world", add_special_tokens=False)["input_ids"]
    stopped = _split_completion(tiny_qm, [hello, world, eos, hello, eos], {eos})
    assert stopped == Completion(" hello world", (hello, world), "stop")
    full = _split_completion(tiny_qm, [hello, world], {eos})
    assert full == Completion(" hello world", (hello, world), "length")


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_qm: QuarkModel) -> None:
    params = SamplingParams(max_new_tokens=8, greedy=True)
    for quantile in (0, 4, None):
        batched = generate(tiny_qm, PROMPTS, quantile, params, batch_size=len(PROMPTS))
        alone = [generate(tiny_qm, [p], quantile, params)[0] for p in PROMPTS]
        assert batched == alone
        assert all(len(c.token_ids) == 8 for c in batched)


def test_max_prompt_tokens_keeps_the_end_of_prompts(tiny_qm: QuarkModel) -> None:
    params = SamplingParams(max_new_tokens=4, greedy=True)
    long = "one two three four five six seven"
    short = tiny_qm.tokenizer.decode(tiny_qm.tokenizer(long)["input_ids"][-3:])
    cut = generate(tiny_qm, [long], 0, params, max_prompt_tokens=3)
    assert cut == generate(tiny_qm, [short], 0, params)
