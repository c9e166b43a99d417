"""quark.evaluation: the paper's metrics on hand values and an end-to-end run on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from quark.evaluation import (
    completion_nll,
    diversity_metrics,
    evaluate,
    perplexity,
    sample_many,
    toxicity_metrics,
)
from quark.models import QuarkModel
from quark.sampling import SamplingParams, generate
from quark.version_eval import reference_scores

PROMPTS = ["The cat sat on the", "Rain falls on the city and"]


def test_toxicity_metrics_on_hand_values() -> None:
    # Per-prompt maxima: 0.7, 0.3, 0.5 -> mean 0.5; two of three reach 0.5.
    result = toxicity_metrics([[0.1, 0.7], [0.2, 0.3], [0.5, 0.0]])
    assert result["expected_max_toxicity"] == pytest.approx(0.5)
    assert result["toxicity_probability"] == pytest.approx(2 / 3)
    assert toxicity_metrics([[0.49]])["toxicity_probability"] == 0.0
    assert toxicity_metrics([[0.9, 0.1]], threshold=0.95)["toxicity_probability"] == 0.0


def test_diversity_metrics_on_hand_values() -> None:
    # Prompt 1: unigrams a b c a b d (4/6), bigrams ab bc ab bd (3/4), trigrams abc abd (2/2).
    # Prompt 2: x x x -> 1/3, 1/2, 1/1.
    result = diversity_metrics([["a b c", "a b d"], ["x x x"]])
    assert result["dist-1"] == pytest.approx((4 / 6 + 1 / 3) / 2)
    assert result["dist-2"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert result["dist-3"] == pytest.approx(1.0)


def test_perplexity_of_own_greedy_completions(tiny_qm: QuarkModel) -> None:
    completions = generate(tiny_qm, PROMPTS, None, SamplingParams(8, greedy=True))
    texts = [c.text for c in completions]
    greedy = perplexity(tiny_qm, PROMPTS, texts, batch_size=1)
    assert math.isfinite(greedy) and greedy > 1.0
    # Greedy text is far more likely than a fixed unrelated continuation under the same model.
    other = perplexity(tiny_qm, PROMPTS, [" zebra quantum marmalade"] * 2)
    assert greedy < other
    assert perplexity(tiny_qm, PROMPTS, texts, batch_size=2) == pytest.approx(greedy, rel=1e-4)


def test_reference_scores_share_one_forward_of_the_original(tiny_qm: QuarkModel) -> None:
    """The perplexity equals perplexity() under the original; the KL is zero against itself
    and positive against a changed policy, whose change leaves the perplexity alone."""
    texts = [c.text for c in generate(tiny_qm, PROMPTS, None, SamplingParams(8, greedy=True))]
    original = copy.deepcopy(tiny_qm.model)
    ppl, kl = reference_scores(tiny_qm, original, PROMPTS, texts, None, batch_size=1)
    # rel 1e-3: this original is the policy's copy, and reference_scores leaves its reward
    # tokens out of the softmax (a real original has none).
    assert ppl == pytest.approx(perplexity(tiny_qm, PROMPTS, texts), rel=1e-3)
    assert kl == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        tiny_qm.model.get_output_embeddings().weight.mul_(1.5)
    changed_ppl, changed_kl = reference_scores(tiny_qm, original, PROMPTS, texts, None)
    assert changed_ppl == pytest.approx(ppl, rel=1e-4)
    assert changed_kl > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as an unlearn job evaluates on bf16
        bf16_ppl, bf16_kl = reference_scores(tiny_qm, original, PROMPTS, texts, None)
    assert bf16_ppl == pytest.approx(ppl, rel=0.05)
    assert bf16_kl == pytest.approx(changed_kl, rel=0.1, abs=1e-3)


def test_perplexity_of_empty_completions_after_a_one_token_prompt(tiny_qm: QuarkModel) -> None:
    """Regression: this used to fail in completion_logits (no position left for the label)."""
    assert perplexity(tiny_qm, ["Hi", "Rain"], ["", ""]) == 1.0  # no tokens: exp(0)


def test_completion_nll_conditioned_on_a_reward_token(tiny_qm: QuarkModel) -> None:
    """With ``quantile`` the rows start with that reward token: the NLL equals one computed
    by hand from a single forward of (token + prompt + completion)."""
    prompt, completion = PROMPTS[0], " mat and slept"
    [(nll, count)] = completion_nll(tiny_qm, [prompt], [completion], quantile=0)
    p_ids = tiny_qm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tiny_qm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tiny_qm.prefix_ids(0) + p_ids + c_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_qm.model(ids).logits[0].float(), dim=-1)  # [L, V]
    first = ids.shape[1] - len(c_ids)  # position of the first completion token
    by_hand = -sum(logprobs[first + i - 1, t].item() for i, t in enumerate(c_ids))
    assert count == len(c_ids)
    assert nll == pytest.approx(by_hand, rel=1e-4)
    [(untokened, _)] = completion_nll(tiny_qm, [prompt], [completion])
    assert untokened != pytest.approx(nll, rel=1e-6)  # the token is really there


def test_sample_many_shape(tiny_qm: QuarkModel) -> None:
    per_prompt = sample_many(tiny_qm, PROMPTS, 0, 3, SamplingParams(4), seed=0)
    assert len(per_prompt) == 2 and all(len(texts) == 3 for texts in per_prompt)


def test_evaluate_toxicity_on_the_tiny_model(tiny_qm: QuarkModel) -> None:
    result = evaluate(tiny_qm, tiny_qm, "toxicity", PROMPTS, 0, samples=3, max_new_tokens=5)
    expected = {
        "prompts",
        "samples",
        "perplexity",
        "dist-1",
        "dist-2",
        "dist-3",
        "expected_max_toxicity",
        "toxicity_probability",
        "mean_toxicity",
        "degenerate_share",
        "metrics",
        "per_prompt",
        "examples",
    }
    assert expected <= set(result)
    assert result["prompts"] == 2 and result["samples"] == 3
    assert math.isfinite(result["perplexity"]) and result["perplexity"] > 1
    assert 0 <= result["expected_max_toxicity"] <= 1
    assert 0 <= result["toxicity_probability"] <= 1
    assert all(0 <= result[f"dist-{n}"] <= 1 for n in (1, 2, 3))
    assert [e["prompt"] for e in result["examples"]] == PROMPTS
    assert all(len(e["completion"]) == 3 for e in result["examples"])


def test_evaluate_toxicity_uses_the_given_judge(tiny_qm: QuarkModel) -> None:
    def scorer(prompts: object, completions: list[str]) -> list[float]:
        return [0.25] * len(completions)  # non-toxicity reward: toxicity 0.75 everywhere

    result = evaluate(
        tiny_qm,
        tiny_qm,
        "toxicity",
        PROMPTS,
        None,
        samples=2,
        max_new_tokens=3,
        judges={"constant": scorer},
    )
    assert result["expected_max_toxicity"] == pytest.approx(0.75)
    assert result["toxicity_probability"] == 1.0
    assert result["mean_toxicity"] == pytest.approx(0.75)
    assert result["judge"] == "constant"
    assert result["metrics"]["expected_max_toxicity@constant"] == {
        "value": pytest.approx(0.75),
        "low": pytest.approx(0.75),
        "high": pytest.approx(0.75),
    }


def test_evaluate_repetition_and_sentiment(tiny_qm: QuarkModel) -> None:
    result = evaluate(tiny_qm, tiny_qm, "repetition", PROMPTS, 0, max_new_tokens=8)
    assert {"rep-2", "rep-3", "rep-4", "diversity", "examples"} <= set(result)
    product = math.prod(1 - result[f"rep-{n}"] for n in (2, 3, 4))
    assert result["diversity"] == pytest.approx(product)
    assert all(0 <= result[f"rep-{n}"] <= 1 for n in (2, 3, 4))

    sentiment = evaluate(tiny_qm, tiny_qm, "sentiment", PROMPTS, 4, samples=2, max_new_tokens=4)
    assert 0 <= sentiment["positive_share"] <= 1


def test_evaluate_unknown_task(tiny_qm: QuarkModel) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(tiny_qm, tiny_qm, "summaries", PROMPTS[:1], 0, samples=1, max_new_tokens=2)
