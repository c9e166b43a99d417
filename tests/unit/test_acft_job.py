"""The online ACFT job (objective=acft) on the tiny model with an in-memory pool: it
publishes a version with its auxiliary head, judged on the no-token output; the selector
dispatches; suspend/resume and cancel behave as the Quark job's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import quark.online.job as job_module
from quark.acft.head import HEAD_CONFIG, HEAD_WEIGHTS, load_head
from quark.online.acft_job import unprompted_records
from quark.online.job import JobCancelled, JobSuspended, UnlearnDeps
from quark.online.objectives import run_job
from quark.online.params import UnlearnParams
from quark.pool import PoolRecord
from tests.unit import test_online
from tests.unit.test_online import FAST, FakePool

job_env = test_online.job_env  # the same fixture: tiny model store + scored in-memory pool

ACFT = {
    **FAST,
    "objective": "acft",
    "steps": 3,
    "acft_aux_steps": 2,
    "acft_aux_batch_size": 8,
    "acft_threshold": 0.3,
    "explore_prompts": 4,
}


def _params(**changes: Any) -> UnlearnParams:
    return UnlearnParams.from_dict({**ACFT, **changes})


def test_acft_job_publishes_its_version_with_the_aux_head(
    job_env: tuple[UnlearnDeps, FakePool], monkeypatch: pytest.MonkeyPatch
) -> None:
    deps, _ = job_env
    quantiles: list[int | None] = []
    evaluate = job_module.evaluate_version

    def spy(*args: Any, **kwargs: Any) -> Any:
        quantiles.append(kwargs["quantile"])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(job_module, "evaluate_version", spy)
    events: list[dict[str, Any]] = []
    result = run_job(deps, _params(), job_id="acft-1", progress=events.append)
    assert result["status"] == "published" and result["version"] == "v0001", result
    assert result["objective"] == "acft"
    assert quantiles == [None, None]  # both versions judged on the default output
    meta = deps.store.metadata("v0001")
    assert meta["objective"] == "acft" and meta["parent"] == "v0000"
    assert meta["aux_head"]["base_version"] == "v0000" and meta["aux_head"]["steps"] == 2
    assert meta["aux_head"]["warm_start"] is None
    assert {f"aux_head/{HEAD_WEIGHTS}", f"aux_head/{HEAD_CONFIG}"} <= set(meta["files"])
    assert deps.store.verify("v0001")
    head_dir = deps.store.aux_head("v0001")
    assert head_dir is not None and load_head(head_dir).vocab_size > 0
    window = meta["data_window"]
    assert window["aux_samples"] > 0 and 0 < window["corpus"] <= window["train_records"]
    assert [e["aux_step"] for e in events if e.get("phase") == "aux"] == [1, 2]
    assert [e["step"] for e in events if "nll" in e] == [1, 2, 3]
    assert all("kl" in e for e in events if "nll" in e)
    # The next ACFT job continues from v0001 and warm-starts from its head.
    second = run_job(deps, _params(), job_id="acft-2")
    assert second["status"] == "published", second
    assert deps.store.metadata("v0002")["aux_head"]["warm_start"] == "v0001"


def test_quark_objective_still_runs_the_quark_job(
    job_env: tuple[UnlearnDeps, FakePool],
) -> None:
    deps, _ = job_env
    result = run_job(deps, UnlearnParams.from_dict(FAST), job_id="quark-1")
    assert result["status"] == "published" and result["objective"] == "quark"
    meta = deps.store.metadata("v0001")
    assert meta["objective"] == "quark" and "aux_head" not in meta
    assert deps.store.aux_head("v0001") is None


def test_suspended_acft_job_resumes_from_its_checkpoint(
    job_env: tuple[UnlearnDeps, FakePool], tmp_path: Path
) -> None:
    deps, _ = job_env
    checkpoint = tmp_path / "ckpt"
    steps: list[int] = []
    with pytest.raises(JobSuspended):
        run_job(
            deps,
            _params(steps=4),
            job_id="acft-3",
            progress=lambda e: steps.append(e.get("step", 0)),
            should_suspend=lambda: max(steps, default=0) >= 2,
            checkpoint_dir=checkpoint,
        )
    assert (checkpoint / "resume.json").is_file() and (checkpoint / "llm").is_dir()
    resumed: list[dict[str, Any]] = []
    result = run_job(
        deps, _params(steps=4), job_id="acft-3", progress=resumed.append, checkpoint_dir=checkpoint
    )
    assert result["status"] == "published" and result["steps"] == 4
    assert [e["step"] for e in resumed if "nll" in e] == [3, 4]  # continued, not restarted
    assert not [e for e in resumed if e.get("phase") == "aux"]  # the head was kept
    assert not checkpoint.exists()


def test_cancelled_acft_job_publishes_nothing(
    job_env: tuple[UnlearnDeps, FakePool], tmp_path: Path
) -> None:
    deps, _ = job_env
    seen: list[dict[str, Any]] = []
    with pytest.raises(JobCancelled):
        run_job(
            deps,
            _params(),
            job_id="acft-4",
            progress=seen.append,
            should_stop=lambda: any(e.get("phase") == "aux" for e in seen),
            checkpoint_dir=tmp_path / "ckpt",
        )
    assert deps.store.versions() == ["v0000"] and not (tmp_path / "ckpt").exists()


def test_acft_job_without_accepted_completions_is_skipped(
    job_env: tuple[UnlearnDeps, FakePool],
) -> None:
    deps, _ = job_env
    result = run_job(deps, _params(acft_threshold=2.0), job_id="acft-5")
    assert result["status"] == "skipped" and "reward >= 2.0" in result["reason"]


def test_only_default_output_records_of_the_version_label_the_head() -> None:
    records = [
        PoolRecord("p", "a", 1.0, {"model_version": "v0001", "reward_token": None}),
        PoolRecord("p", "b", 1.0, {"model_version": "v0001", "reward_token": "<|q0|>"}),
        PoolRecord("p", "c", 1.0, {"model_version": "v0000", "reward_token": None}),
    ]
    assert [r.completion for r in unprompted_records(records, "v0001")] == ["a"]
