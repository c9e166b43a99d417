"""The utility KL term of Quark training (``utility_kl_coef``): on, it adds KL(pi_theta ||
pi_ref) over utility passages to the step's loss and reports it; off, the step is the one it
was before the term existed. The online Quark job gives its trainer the utility text's
passages."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from quark.config import QuarkConfig
from quark.models import QuarkModel, frozen_copy
from quark.online.job import UnlearnDeps, UnlearnJob
from quark.online.params import UnlearnParams
from quark.pool import PoolRecord, QuantizedSample
from quark.rewards import KeywordShareReward
from quark.training import QuarkTrainer

SAMPLES = [
    QuantizedSample("The cat sat on the", " mat and slept.", 0.9, 0),
    QuantizedSample("Hi", " there, friend", 0.4, 0),
]

PASSAGES = [
    "The river rises in the hills and flows east through three towns before the sea",
    "In 1890 the company built a railway line that linked the mines with the harbour",
    "The species nests on cliffs and feeds on small fish caught near the surface",
]


def _trainer(qm: QuarkModel, utility: list[str], **overrides: object) -> QuarkTrainer:
    values: dict[str, object] = {
        "lr": 1e-3,
        "warmup_steps": 0,
        "steps": 4,
        "batch_size": 2,
        "explore_prompts": 0,
        "utility_tokens": 12,
        "seed": 5,
    }
    config = QuarkConfig(**{**values, **overrides})  # type: ignore[arg-type]
    reward = KeywordShareReward("the")
    return QuarkTrainer(qm, frozen_copy(qm), reward, [], config, utility=utility)


def _weights(qm: QuarkModel) -> list[torch.Tensor]:
    return [p.detach().clone() for p in qm.model.parameters()]


def test_the_term_is_added_to_the_loss_and_reported(tiny_qm: QuarkModel) -> None:
    on = _trainer(copy.deepcopy(tiny_qm), PASSAGES, utility_kl_coef=0.5)
    off = _trainer(copy.deepcopy(tiny_qm), PASSAGES)
    first_on, first_off = on.train_step(SAMPLES), off.train_step(SAMPLES)
    # Same weights before the first step: the same Quark loss, plus the weighted term.
    assert first_on.nll == pytest.approx(first_off.nll)
    assert first_on.kl == pytest.approx(first_off.kl)
    # The top token alone moves the policy away from the reference on plain text.
    assert first_on.utility_kl > 0 and first_off.utility_kl == 0.0
    assert first_on.loss == pytest.approx(first_off.loss + 0.5 * first_on.utility_kl, rel=1e-5)
    before = _weights(on.qm)
    second = on.train_step(SAMPLES)
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(on.qm), strict=True))
    assert second.utility_kl > 0 and second.as_dict()["utility_kl"] == second.utility_kl


def test_the_term_changes_the_update(tiny_qm: QuarkModel) -> None:
    on = _trainer(copy.deepcopy(tiny_qm), PASSAGES, utility_kl_coef=1.0)
    off = _trainer(copy.deepcopy(tiny_qm), PASSAGES)
    on.train_step(SAMPLES)
    off.train_step(SAMPLES)
    moved = [not torch.equal(a, b) for a, b in zip(_weights(on.qm), _weights(off.qm), strict=True)]
    assert any(moved)


def test_coefficient_zero_leaves_the_step_as_it_was(tiny_qm: QuarkModel) -> None:
    with_passages = _trainer(copy.deepcopy(tiny_qm), PASSAGES, utility_kl_coef=0.0)
    without = _trainer(copy.deepcopy(tiny_qm), [])
    for _ in range(2):
        a, b = with_passages.train_step(SAMPLES), without.train_step(SAMPLES)
        assert a == b and a.utility_kl == 0.0
    assert with_passages.rng.getstate() == without.rng.getstate()  # no passage was drawn
    for x, y in zip(_weights(with_passages.qm), _weights(without.qm), strict=True):
        assert torch.equal(x, y)


def test_passages_are_drawn_from_the_seeded_rng(tiny_qm: QuarkModel) -> None:
    first = _trainer(copy.deepcopy(tiny_qm), PASSAGES, utility_kl_coef=1.0, utility_rows=1)
    again = _trainer(copy.deepcopy(tiny_qm), PASSAGES, utility_kl_coef=1.0, utility_rows=1)
    assert [first.train_step(SAMPLES) for _ in range(2)] == [
        again.train_step(SAMPLES) for _ in range(2)
    ]
    # No passages, or no rows: the term is off whatever the coefficient.
    no_passages = _trainer(copy.deepcopy(tiny_qm), [], utility_kl_coef=1.0)
    assert no_passages.train_step(SAMPLES).utility_kl == 0.0
    rows0 = _trainer(copy.deepcopy(tiny_qm), PASSAGES, utility_kl_coef=1.0, utility_rows=0)
    assert rows0.train_step(SAMPLES).utility_kl == 0.0


def test_bf16_autocast_utility_step_is_finite(tiny_qm: QuarkModel) -> None:
    trainer = _trainer(tiny_qm, PASSAGES, utility_kl_coef=1.0, train_precision="bfloat16")
    stats = trainer.train_step(SAMPLES)
    assert torch.isfinite(torch.tensor([stats.loss, stats.utility_kl])).all()
    assert stats.utility_kl > 0


def test_metrics_log_the_term(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    trainer = _trainer(tiny_qm, PASSAGES, utility_kl_coef=1.0)
    trainer.metrics_path = tmp_path / "metrics.jsonl"
    trainer.pool.add(
        PoolRecord(s.prompt, s.completion, r) for s in SAMPLES for r in (0.1, 0.5, 0.9)
    )
    trainer.run(2)
    events = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
    logged = [e["utility_kl"] for e in events if e["event"] == "train"]
    assert len(logged) == 2 and all(v > 0 for v in logged)


def test_the_online_quark_job_gives_its_trainer_the_passages(
    tiny_qm: QuarkModel, tmp_path: Path
) -> None:
    path = tmp_path / "wiki.txt"
    path.write_text(" = Heading = \n" + "\n".join(PASSAGES) + "\n")
    deps = UnlearnDeps(
        store=cast(Any, None),
        pool=cast(Any, None),
        original=tiny_qm,
        reward_fn=KeywordShareReward("the"),
        utility_text=path,
    )

    def job(deps: UnlearnDeps, **params: Any) -> UnlearnJob:
        never = lambda: False  # noqa: E731
        return UnlearnJob(deps, UnlearnParams(**params), "job", lambda _: None, never, never, None)

    assert job(deps, utility_kl_coef=0.5)._utility_passages() == PASSAGES
    assert job(deps)._utility_passages() == []  # off: the file is not read
    trainer = job(deps)._trainer(copy.deepcopy(tiny_qm), [], PASSAGES)
    assert trainer.utility == PASSAGES
    with pytest.raises(ValueError, match="set QUARK_UTILITY_TEXT"):
        job(replace(deps, utility_text=None), utility_kl_coef=0.5)._utility_passages()
