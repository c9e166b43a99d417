"""ACFT end to end on the tiny model: the auxiliary head learns which token breaks the
constraint, and fine-tuning with the KL term makes the model emit that token less often,
while the same fine-tuning without it does not.

A randomly initialised model emits any given token with probability ~1/49152, so a fixed
logit bonus (a hook, not a parameter; on the policy and the frozen base alike, as in
tests/unit/test_training.py) makes " stupid" a ~15% token. The oracle: a completion
satisfies the constraint iff it avoids that word. The corpus is unfiltered: the same
samples, violating ones included, so the NLL alone keeps (or raises) the word's rate.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path

import torch

from quark.acft import (
    ACFTConfig,
    ACFTTrainer,
    AuxTrainer,
    encode_examples,
    new_head,
    sample_labelled,
)
from quark.models import QuarkModel, frozen_copy
from quark.sampling import SamplingParams, generate
from testkit.tiny_model import build_tiny_model

LogitBias = Callable[..., AbstractContextManager[None]]

SEED = int(os.environ.get("ACFT_TEST_SEED", "0"))  # seeds 0-3 checked (docs/acft.md)
WORD = "stupid"
PRIOR = 9.0  # logit bonus: " stupid" ~15% of the untrained model's tokens
LENGTH = 8


def _prompts() -> list[str]:
    words = "the a cat dog sun rain house tree river city music book garden light road water"
    rng = random.Random(SEED)
    vocab = words.split()
    return [
        " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 5))).capitalize()
        for _ in range(32)
    ]


def _oracle(_prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Reward 1 when the completion avoids the word, 0 when it says it."""
    return [0.0 if WORD in c else 1.0 for c in completions]


def _rate(qm: QuarkModel, prompts: list[str], token: int) -> float:
    """Share of ``token`` among 1024 sampled tokens (fixed seed: same draws for every model)."""
    completions = generate(qm, prompts * 4, None, SamplingParams(LENGTH), batch_size=128, seed=1234)
    tokens = [t for c in completions for t in c.token_ids]
    return sum(t == token for t in tokens) / len(tokens)


def test_acft_unlearns_a_token_that_the_nll_alone_keeps(
    tokenizer_cache: Path, logit_bias: LogitBias
) -> None:
    started = time.perf_counter()
    qm = build_tiny_model(tokenizer_cache, seed=SEED)
    token_ids = qm.tokenizer(" " + WORD, add_special_tokens=False)["input_ids"]
    assert len(token_ids) == 1
    token = token_ids[0]
    pristine = copy.deepcopy(qm)
    base = frozen_copy(qm)
    prompts = _prompts()
    config = ACFTConfig(
        aux_steps=40,
        aux_batch_size=16,
        aux_lr=1e-2,
        steps=30,
        batch_size=8,
        lr=1e-3,
        warmup_steps=3,
        kl_coef=3.0,
        response_length=LENGTH,
        max_prompt_tokens=16,
        seed=SEED,
    )

    with logit_bias([qm.model, base], {token: PRIOR}):
        before = _rate(qm, prompts, token)
        samples = sample_labelled(
            qm, prompts * 4, _oracle, config, SamplingParams(LENGTH), seed=7, batch_size=128
        )
        satisfied = sum(s.satisfied for s in samples) / len(samples)

        aux = AuxTrainer(qm, base, new_head(qm, config), config)
        aux_started = time.perf_counter()
        aux_stats = aux.fit(samples)
        aux_seconds = (time.perf_counter() - aux_started) / config.aux_steps

        # What the trained head does to the target: q(T) / p(T) over the corpus prefixes.
        probe = ACFTTrainer(copy.deepcopy(pristine), base, aux.head, config)
        batch = encode_examples(qm, samples[:64], config)
        target, base_logprobs = probe.target(batch, samples[:64])
        ratio = (target[..., token] - base_logprobs[..., token]).exp()
        suppression = float((ratio * batch.label_mask).sum() / batch.label_mask.sum())

        after: dict[float, float] = {}
        llm_seconds = 0.0
        for kl_coef in (config.kl_coef, 0.0):
            policy = copy.deepcopy(pristine)
            with logit_bias([policy.model], {token: PRIOR}):
                trainer = ACFTTrainer(policy, base, aux.head, replace(config, kl_coef=kl_coef))
                llm_started = time.perf_counter()
                trainer.fit(samples)
                llm_seconds = (time.perf_counter() - llm_started) / config.steps
                after[kl_coef] = _rate(policy, prompts, token)

    acft, control = after[config.kl_coef], after[0.0]
    summary = (
        f"seed={SEED} satisfied={satisfied:.2f} rate before={before:.3f} "
        f"after ACFT={acft:.3f} after NLL only={control:.3f}; q(T)/p(T)={suppression:.3f} "
        f"aux: bce={aux_stats[-1].bce:.3f} consistency={aux_stats[-1].consistency:.3f} "
        f"{aux_seconds:.2f}s/step; LLM {llm_seconds:.2f}s/step; "
        f"total {time.perf_counter() - started:.0f}s"
    )
    print(summary)
    torch.testing.assert_close(
        torch.tensor(aux_stats[0].bce), torch.tensor(0.6931), atol=1e-3, rtol=0
    )  # the zero-initialised head starts at R = 1/2
    assert 0.08 < before < 0.25, summary  # the prior makes the word common
    assert 0.1 < satisfied < 0.6, summary  # both labels are well represented
    assert suppression < 0.4, summary  # the head learned that the word breaks C
    assert acft < 0.7 * before, summary  # ACFT: clearly less often than before
    assert control > 0.9 * before, summary  # the NLL alone does not reduce it
    assert acft < control - 0.04, summary
