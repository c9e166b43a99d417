"""app.decoding: the serving decode loop agrees with HF generate and is batch-independent."""

from __future__ import annotations

import torch

from app.decoding import Row, RowSampling, decode, make_batch, sample_tokens
from quark.models import QuarkModel
from quark.sampling import SamplingParams, eos_ids, generate_ids

PROMPTS = ["Hello there, my friend", "The cat", "In 1990 the city of Paris was"]


def _ids(qm: QuarkModel, text: str) -> list[int]:
    return list(qm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_greedy_matches_hf_generate(tiny_qm: QuarkModel) -> None:
    ids = [_ids(tiny_qm, p) for p in PROMPTS]
    expected = generate_ids(tiny_qm, ids, 0, SamplingParams(max_new_tokens=12, greedy=True))
    rows = decode(tiny_qm, [Row(tiny_qm.prefix_ids(0) + i, RowSampling(12, 0.0)) for i in ids])
    assert [r.tokens for r in rows] == [list(c.token_ids) for c in expected]
    assert all(r.finish_reason == "length" for r in rows)


def test_rows_joining_mid_flight_match_solo_runs(tiny_qm: QuarkModel) -> None:
    """Continuous batching must not change what a row samples (same seed, same tokens)."""
    batch = make_batch(tiny_qm)
    a = Row(_ids(tiny_qm, PROMPTS[0]), RowSampling(15, 1.0, seed=3))
    b = Row(_ids(tiny_qm, PROMPTS[1]), RowSampling(15, 1.0, seed=4))
    c = Row(_ids(tiny_qm, PROMPTS[2]), RowSampling(10, 0.8, 0.9, seed=5))
    batch.add([a])
    batch.step()
    batch.step()
    batch.add([b])
    batch.step()
    batch.add([c])
    while len(batch):
        batch.step()
    for row in (a, b, c):
        solo = decode(tiny_qm, [Row(row.prompt_ids, row.sampling)])[0]
        assert row.tokens == solo.tokens


def test_seed_reproducible_and_seeds_differ(tiny_qm: QuarkModel) -> None:
    ids = _ids(tiny_qm, PROMPTS[0])
    first = decode(tiny_qm, [Row(ids, RowSampling(10, 1.0, seed=7))])[0].tokens
    again = decode(tiny_qm, [Row(ids, RowSampling(10, 1.0, seed=7))])[0].tokens
    other = decode(tiny_qm, [Row(ids, RowSampling(10, 1.0, seed=8))])[0].tokens
    assert first == again
    assert first != other


def test_dropped_row_leaves_others_unchanged(tiny_qm: QuarkModel) -> None:
    batch = make_batch(tiny_qm)
    keep = Row(_ids(tiny_qm, PROMPTS[2]), RowSampling(12, 1.0, seed=1))
    gone = Row(_ids(tiny_qm, PROMPTS[0]), RowSampling(12, 1.0, seed=2))
    batch.add([gone, keep])
    batch.step()
    batch.drop([gone])  # a cancelled request
    assert batch.rows == [keep]
    while len(batch):
        batch.step()
    assert keep.tokens == decode(tiny_qm, [Row(keep.prompt_ids, keep.sampling)])[0].tokens
    assert len(gone.tokens) == 2


def test_reward_tokens_are_never_generated(tiny_qm: QuarkModel, logit_bias) -> None:
    reward_ids = set(tiny_qm.reward_tokens.ids)
    with logit_bias(tiny_qm.model, {i: 50.0 for i in reward_ids}):
        rows = decode(
            tiny_qm, [Row(_ids(tiny_qm, "Hi"), RowSampling(8, 1.0, seed=s)) for s in (1, 2)]
        )
    assert all(not reward_ids & set(r.tokens) for r in rows)


def test_eos_stops_a_row(tiny_qm: QuarkModel, logit_bias) -> None:
    eos = eos_ids(tiny_qm)[0]
    with logit_bias(tiny_qm.model, {eos: 50.0}):
        row = decode(tiny_qm, [Row(_ids(tiny_qm, "Hi"), RowSampling(8, 1.0, seed=1))])[0]
    assert row.finish_reason == "stop"
    assert row.tokens == []


def test_context_limit_finishes_with_length(tiny_qm: QuarkModel) -> None:
    ids = _ids(tiny_qm, PROMPTS[0])
    row = decode(tiny_qm, [Row(ids, RowSampling(50, 1.0, seed=1))], max_length=len(ids) + 3)[0]
    assert row.finish_reason == "length"
    assert len(row.tokens) == 3


def test_sample_tokens_greedy_and_tiny_top_p() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    temperature = torch.tensor([0.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 1e-6, 1.0])  # row 1: nucleus of the top token only
    for _ in range(20):
        tokens = sample_tokens(logits.clone(), temperature, top_p, gens)
        assert tokens[:2].tolist() == [1, 0]
        assert 0 <= int(tokens[2]) < 3
