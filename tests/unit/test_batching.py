"""quark.batching: (reward token + prompt -> completion) rows and their completion logits, and
the utility term's (reward token + passage | passage) rows."""

from __future__ import annotations

import pytest
import torch

from quark.batching import build_batch, build_utility_batch, completion_logits, position_ids
from quark.models import QuarkModel, frozen_copy
from quark.pool import QuantizedSample

SAMPLES = [
    QuantizedSample("The cat sat on the mat and", " looked at the dog.", 0.9, 0),
    QuantizedSample("Hi", " there", 0.5, 2),
    QuantizedSample("A much longer prompt about rivers, trees and the city", " ok", 0.1, 4),
    QuantizedSample("Rain", "", 0.0, 3),  # an empty completion (EOS right away)
]


def _ids(qm: QuarkModel, text: str) -> list[int]:
    return list(qm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def test_policy_rows_put_the_reward_token_right_before_the_prompt(tiny_qm: QuarkModel) -> None:
    batch = build_batch(tiny_qm, SAMPLES, max_prompt_tokens=64, response_length=20)
    reward_ids = set(tiny_qm.reward_tokens.ids)
    for sample, row in zip(SAMPLES, _unpadded(batch.policy_ids, batch.policy_mask), strict=True):
        expected = [
            tiny_qm.reward_tokens.ids[sample.quantile],
            *_ids(tiny_qm, sample.prompt),
            *_ids(tiny_qm, sample.completion),
        ]
        assert row == expected
        assert reward_ids.isdisjoint(row[1:])
    # Left padding: every row ends at the last column, padding sits in front.
    assert torch.all(batch.policy_mask[:, -1] == 1)
    assert torch.all(batch.policy_mask.cumsum(-1).diff(dim=-1) <= 1)
    pad = tiny_qm.tokenizer.pad_token_id
    assert torch.all(batch.policy_ids[batch.policy_mask == 0] == pad)


def test_reference_rows_have_no_reward_token(tiny_qm: QuarkModel) -> None:
    batch = build_batch(tiny_qm, SAMPLES, max_prompt_tokens=64, response_length=20)
    rows = _unpadded(batch.ref_ids, batch.ref_mask)
    for sample, row in zip(SAMPLES, rows, strict=True):
        assert row == _ids(tiny_qm, sample.prompt) + _ids(tiny_qm, sample.completion)
        assert set(tiny_qm.reward_tokens.ids).isdisjoint(row)
    assert batch.ref_ids.shape[1] == batch.policy_ids.shape[1] - 1


def test_completions_are_right_aligned_labels(tiny_qm: QuarkModel) -> None:
    batch = build_batch(tiny_qm, SAMPLES, max_prompt_tokens=64, response_length=20)
    completions = [_ids(tiny_qm, s.completion) for s in SAMPLES]
    width = max(len(c) for c in completions)
    assert batch.labels.shape == batch.label_mask.shape == (len(SAMPLES), width)
    for i, ids in enumerate(completions):
        real = batch.label_mask[i].bool()
        assert int(real.sum()) == len(ids)
        assert batch.labels[i][real].tolist() == ids
        if ids:
            assert bool(real[-len(ids) :].all())  # right-aligned
        # The labels are the last tokens of both rows.
        n = len(ids)
        if n:
            assert batch.policy_ids[i, -n:].tolist() == ids
            assert batch.ref_ids[i, -n:].tolist() == ids
    assert batch.label_mask[3].sum() == 0  # the empty completion contributes nothing


def test_prompt_and_completion_are_truncated(tiny_qm: QuarkModel) -> None:
    sample = QuantizedSample("one two three four five six", " a b c d e f g", 0.0, 1)
    batch = build_batch(tiny_qm, [sample], max_prompt_tokens=2, response_length=3)
    prompt, completion = _ids(tiny_qm, sample.prompt), _ids(tiny_qm, sample.completion)
    assert batch.policy_ids[0].tolist() == (
        [tiny_qm.reward_tokens.ids[1], *prompt[-2:], *completion[:3]]  # the prompt's end
    )
    assert batch.labels[0].tolist() == completion[:3]


def test_position_ids_ignore_left_padding() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("side", ["policy", "ref"])
def test_completion_logits_equal_unpadded_forward(tiny_qm: QuarkModel, side: str) -> None:
    batch = build_batch(tiny_qm, SAMPLES, max_prompt_tokens=64, response_length=20)
    ids, mask = (
        (batch.policy_ids, batch.policy_mask)
        if side == "policy"
        else (batch.ref_ids, batch.ref_mask)
    )
    width = batch.labels.shape[1]
    model = tiny_qm.model
    with torch.no_grad():
        logits = completion_logits(model, ids, mask, width)
        vocab = model.get_output_embeddings().weight.shape[0]
        assert logits.shape == (len(SAMPLES), width, vocab)
        for i, row in enumerate(_unpadded(ids, mask)):
            n = int(batch.label_mask[i].sum())
            if not n:
                continue
            alone = model(input_ids=torch.tensor([row])).logits[0]  # [L, V]
            # Position j predicts token j + 1: the completion's n tokens come from L-n-1..L-2.
            expected = alone[-n - 1 : -1]
            torch.testing.assert_close(logits[i, -n:], expected, atol=1e-4, rtol=1e-4)


def test_one_token_prompts_with_empty_completions_keep_a_completion_step(
    tiny_qm: QuarkModel,
) -> None:
    """Regression: a 1-token prompt whose completions are all empty gave 0 reference steps."""
    samples = [QuantizedSample("Hello", "", 0.0, 0), QuantizedSample("Hi", "", 0.0, 4)]
    batch = build_batch(tiny_qm, samples, 64, 20)
    assert batch.ref_ids.shape[1] == 1 and batch.labels.shape[1] == 1
    reference = frozen_copy(tiny_qm)
    with torch.no_grad():
        policy = completion_logits(tiny_qm.model, batch.policy_ids, batch.policy_mask, 1)
        ref = completion_logits(reference, batch.ref_ids, batch.ref_mask, 1)
    assert policy.shape[:2] == ref.shape[:2] == (2, 1)
    assert torch.isfinite(ref).all()


PASSAGES = ["Rivers run to the sea and the sea runs nowhere at all", "A short one"]


def test_utility_rows_prefix_the_policy_only_and_cut_each_passage(tiny_qm: QuarkModel) -> None:
    top = tiny_qm.prefix_ids(0)
    batch = build_utility_batch(tiny_qm, PASSAGES, max_tokens=8, prefix=top)
    passages = [_ids(tiny_qm, p)[:8] for p in PASSAGES]
    assert len(passages[0]) == 8 and 1 < len(passages[1]) < 8  # one cut, one shorter
    assert _unpadded(batch.policy_ids, batch.policy_mask) == [top + p for p in passages]
    assert _unpadded(batch.ref_ids, batch.ref_mask) == passages
    # Targets: every passage token but the first, right-aligned.
    assert batch.label_mask.shape == (2, 7)
    assert batch.label_mask.sum(-1).tolist() == [7.0, len(passages[1]) - 1.0]
    assert torch.all(batch.label_mask[:, -1] == 1)


def test_utility_logits_of_policy_and_reference_predict_the_same_tokens(
    tiny_qm: QuarkModel,
) -> None:
    """Without a prefix the policy's rows are the reference's: the two logits are equal, and
    each masked position predicts passage token j + 1 from tokens 1..j."""
    batch = build_utility_batch(tiny_qm, PASSAGES, max_tokens=8, prefix=tiny_qm.prefix_ids(0))
    plain = build_utility_batch(tiny_qm, PASSAGES, max_tokens=8, prefix=[])
    width = batch.label_mask.shape[1]
    model = tiny_qm.model
    with torch.no_grad():
        ref = completion_logits(model, batch.ref_ids, batch.ref_mask, width)
        same = completion_logits(model, plain.policy_ids, plain.policy_mask, width)
        policy = completion_logits(model, batch.policy_ids, batch.policy_mask, width)
        for i, passage in enumerate(PASSAGES):
            ids = _ids(tiny_qm, passage)[:8]
            n = len(ids) - 1
            alone = model(input_ids=torch.tensor([ids])).logits[0]  # [n + 1, V]
            torch.testing.assert_close(ref[i, -n:], alone[:-1], atol=1e-4, rtol=1e-4)
            prefixed = model(input_ids=torch.tensor([tiny_qm.prefix_ids(0) + ids])).logits[0]
            torch.testing.assert_close(policy[i, -n:], prefixed[1:-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(same, ref)
