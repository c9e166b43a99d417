"""Online unlearning logic with in-memory fakes: scoring, triggers, the gate, one job."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from quark.models import QuarkModel, load_model
from quark.online.gate import DEFAULT_MAX_KL, GateDecision, is_held_out, promotion_gate
from quark.online.job import JobCancelled, JobSuspended, UnlearnDeps, split_window
from quark.online.objectives import run_job
from quark.online.params import UnlearnParams
from quark.online.scoring import score_pending, trigger_reason
from quark.pool import PoolRecord
from quark.rewards import KeywordShareReward
from quark.service.settings import ServiceSettings
from quark.service.store import MemoryPointer, ModelStore, ensure_initial_version
from quark.version_eval import EvalResult


class FakePool:
    """The OnlinePool protocol over a list, with stream-like ids."""

    def __init__(self, records: Sequence[PoolRecord] = ()) -> None:
        self.entries: list[tuple[str, PoolRecord]] = []
        self.rewards: dict[str, float] = {}
        self.cursors: dict[str, str] = {}
        self.add(records)

    def add(self, records: Sequence[PoolRecord]) -> None:
        for record in records:
            self.entries.append((f"{len(self.entries) + 1}-0", record))

    def read_since(self, cursor: str, count: int) -> list[tuple[str, PoolRecord]]:
        after = int(cursor.split("-")[0])
        return [e for e in self.entries if int(e[0].split("-")[0]) > after][:count]

    def get_rewards(self, record_ids: Sequence[str]) -> dict[str, float]:
        return {i: self.rewards[i] for i in record_ids if i in self.rewards}

    def set_rewards(self, rewards: Mapping[str, float]) -> None:
        self.rewards.update(rewards)

    def get_cursor(self, name: str) -> str:
        return self.cursors.get(name, "0-0")

    def set_cursor(self, name: str, value: str) -> None:
        self.cursors[name] = value

    def newest_scored(self, count: int) -> list[tuple[str, PoolRecord]]:
        scored = [
            (
                i,
                PoolRecord(
                    r.prompt, r.completion, self.rewards[r.record_id], r.metadata, r.record_id
                ),
            )
            for i, r in self.entries
            if r.record_id in self.rewards
        ]
        return scored[-count:]


class CountingReward:
    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[int] = []
        self.fail_after = fail_after
        self.inner = KeywordShareReward("the")

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("reward backend down")
        self.calls.append(len(completions))
        return self.inner(prompts, completions)


def _records(n: int) -> list[PoolRecord]:
    return [PoolRecord(f"prompt {i}", "the cat" if i % 2 else "a dog") for i in range(n)]


# -- scoring ---------------------------------------------------------------------------------
def test_score_pending_scores_everything_once() -> None:
    pool = FakePool(_records(10))
    reward = CountingReward()
    assert score_pending(pool, reward, batch_size=4) == 10
    assert reward.calls == [4, 4, 2]
    assert pool.rewards[pool.entries[1][1].record_id] == 0.5
    assert score_pending(pool, reward, batch_size=4) == 0
    assert reward.calls == [4, 4, 2]
    pool.add(_records(3))
    assert score_pending(pool, reward, batch_size=4) == 3


def test_score_pending_after_a_crash_scores_nothing_twice() -> None:
    pool = FakePool(_records(10))
    with pytest.raises(RuntimeError):
        score_pending(pool, CountingReward(fail_after=1), batch_size=4)
    assert len(pool.rewards) == 4
    # A crash between storing rewards and moving the cursor: the batch is read again.
    pool.cursors["score"] = "0-0"
    retry = CountingReward()
    assert score_pending(pool, retry, batch_size=4) == 6
    assert sum(retry.calls) == 6


def test_duplicated_records_are_scored_and_trained_on_once() -> None:
    records = _records(6)
    pool = FakePool([*records, records[2], records[4]])  # at-least-once logging replays
    reward = CountingReward()
    assert score_pending(pool, reward, batch_size=10) == 6 and reward.calls == [6]
    window = split_window(pool.newest_scored(100), UnlearnParams(eval_fraction=0.0))
    assert sorted(r.record_id for r in window.train) == sorted(r.record_id for r in records)


def test_score_pending_skips_records_logged_with_a_reward_and_non_finite_rewards() -> None:
    records = _records(4)
    records[0].reward = 0.3
    pool = FakePool(records)
    assert score_pending(pool, lambda p, c: [math.nan] + [1.0] * (len(c) - 1), 10) == 2
    assert records[0].record_id not in pool.rewards


# -- triggers and gate -----------------------------------------------------------------------
def test_trigger_reason() -> None:
    assert trigger_reason(100.0, 0.0, 0, 500, 1800, 500) is not None
    assert trigger_reason(100.0, 0.0, 0, 499, 1800, 500) is None
    assert trigger_reason(2000.0, 0.0, 10, 11, 1800, 500) is not None
    assert trigger_reason(2000.0, 0.0, 10, 10, 1800, 500) is None  # nothing new: no retrain
    assert trigger_reason(100.0, 0.0, 900, 600, 1800, 500) is not None  # pool was trimmed


def _eval(reward: float, ppl: float, kl: float = 0.1) -> EvalResult:
    """Every prompt at the mean reward: the paired differences have no spread, so the
    gate's lower bound is the difference of the means."""
    return EvalResult(
        reward=reward, perplexity=ppl, kl=kl, prompts=4, samples=2, prompt_rewards=(reward,) * 4
    )


@pytest.mark.parametrize(
    ("candidate", "active", "tolerance", "rise", "passed"),
    [
        (_eval(0.5, 10.0), _eval(0.4, 10.0), 0.0, 0.25, True),
        (_eval(0.4, 10.0), _eval(0.4, 10.0), 0.0, 0.25, True),  # not worse is enough
        (_eval(0.39, 10.0), _eval(0.4, 10.0), 0.0, 0.25, False),
        (_eval(0.39, 10.0), _eval(0.4, 10.0), 0.02, 0.25, True),
        (_eval(0.5, 12.5), _eval(0.4, 10.0), 0.0, 0.25, True),
        (_eval(0.5, 12.6), _eval(0.4, 10.0), 0.0, 0.25, False),
        (_eval(math.nan, 10.0), _eval(0.4, 10.0), 0.0, 0.25, False),
        (_eval(0.5, math.inf), _eval(0.4, 10.0), 0.0, 0.25, False),
    ],
)
def test_promotion_gate(
    candidate: EvalResult, active: EvalResult, tolerance: float, rise: float, passed: bool
) -> None:
    decision = promotion_gate(
        candidate, active, reward_tolerance=tolerance, max_perplexity_rise=rise
    )
    assert isinstance(decision, GateDecision)
    assert decision.passed is passed
    assert bool(decision.reasons) is not passed


@pytest.mark.parametrize(
    ("kl", "max_kl", "passed"),
    [(0.1, None, True), (0.1, 0.1, True), (0.11, 0.1, False), (math.nan, 0.1, False)],
)
def test_promotion_gate_bounds_kl_to_the_original(
    kl: float, max_kl: float | None, passed: bool
) -> None:
    decision = promotion_gate(_eval(0.5, 10.0, kl), _eval(0.4, 10.0), max_kl=max_kl)
    assert decision.passed is passed
    assert any("KL" in reason for reason in decision.reasons) is not passed


def test_gate_kl_bound_comes_from_settings_and_overrides() -> None:
    settings = ServiceSettings(unlearn=UnlearnParams(max_kl=0.5))
    assert settings.unlearn_params({}).max_kl == 0.5
    assert settings.unlearn_params({"max_kl": 0.2}).max_kl == 0.2
    assert ServiceSettings().unlearn_params({}).max_kl == DEFAULT_MAX_KL == 2.0  # on by default


def test_held_out_split_is_stable_and_about_the_fraction() -> None:
    prompts = [f"prompt number {i}" for i in range(2000)]
    held = [p for p in prompts if is_held_out(p, 0.1)]
    assert 150 < len(held) < 250
    assert held == [p for p in prompts if is_held_out(p, 0.1)]
    assert not any(is_held_out(p, 0.0) for p in prompts)


def test_params_reject_unknown_and_invalid_fields() -> None:
    with pytest.raises(ValueError, match="unknown"):
        UnlearnParams.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="lr"):
        UnlearnParams.from_dict({"lr": -1.0})
    assert UnlearnParams.from_dict({"steps": 3}).steps == 3


# -- one job ---------------------------------------------------------------------------------
PROMPTS = [f"Tell me about item {i}:" for i in range(60)]


@pytest.fixture
def job_env(tmp_path: Path, tiny_model_dir: Path) -> tuple[UnlearnDeps, FakePool]:
    store = ModelStore(tmp_path / "models", MemoryPointer())
    ensure_initial_version(store, str(tiny_model_dir), 5)
    original = load_model(tiny_model_dir, device="cpu")
    reward = KeywordShareReward("the")
    completions = ["the the the", "a b c", "the a b", "x y z the", "no"]
    records = [
        PoolRecord(p, completions[(i + j) % 5], metadata={"model_version": "v0000"})
        for i, p in enumerate(PROMPTS)
        for j in range(2)
    ]
    pool = FakePool(records)
    score_pending(pool, reward, 64)
    return UnlearnDeps(store, pool, original, reward, device="cpu"), pool


FAST = {
    "steps": 6,
    "lr": 1e-3,
    "batch_size": 8,
    "min_records": 10,
    "eval_prompts": 4,
    "eval_samples": 1,
    "eval_fraction": 0.15,
    "response_length": 6,
    "max_perplexity_rise": 1e9,
    "reward_tolerance": 1.0,
}


def test_job_publishes_a_child_of_the_active_version(
    job_env: tuple[UnlearnDeps, FakePool],
) -> None:
    deps, _ = job_env
    events: list[dict[str, Any]] = []
    result = run_job(deps, UnlearnParams.from_dict(FAST), job_id="job-1", progress=events.append)
    assert result["status"] == "published" and result["version"] == "v0001"
    assert deps.store.active() == "v0001"
    meta = deps.store.metadata("v0001")
    assert meta["parent"] == "v0000" and meta["job_id"] == "job-1"
    assert meta["config"]["steps"] == 6 and meta["data_window"]["train_records"] > 0
    assert set(meta["eval"]) >= {"reward", "perplexity", "kl"}
    phases = [e["phase"] for e in events]
    assert phases[:4] == ["window", "load", "eval_active", "train"]
    assert phases[-3:] == ["gate", "publish", "published"]
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4, 5, 6]
    assert set(next(e for e in events if "eval_active" in e)["eval_active"]) >= {"reward", "kl"}
    held = [p for p in PROMPTS if is_held_out(p, 0.15)]
    assert result["window"]["train_records"] == 2 * (len(PROMPTS) - len(held))
    # The gate paired the two evaluations prompt by prompt and recorded its test.
    test = meta["gate"]["reward_test"]
    assert test["n"] == result["window"]["eval_prompts"] == len(meta["eval"]["prompt_rewards"])
    assert test["confidence"] == 0.95 and test["bound"] <= test["estimate"]


def test_a_lora_job_publishes_a_plain_model_with_the_update_merged(
    job_env: tuple[UnlearnDeps, FakePool],
) -> None:
    deps, _ = job_env
    params = UnlearnParams.from_dict({**FAST, "lora_rank": 2, "lr": 1e-2})
    result = run_job(deps, params, job_id="job-lora")
    assert result["status"] == "published"
    assert deps.store.metadata(result["version"])["config"]["lora_rank"] == 2
    parent, child = (load_model(deps.store.path(v), device="cpu") for v in ("v0000", "v0001"))
    names = set(parent.model.state_dict())
    assert set(child.model.state_dict()) == names  # no adapter weights on disk
    changed = [
        n
        for n in names
        if not torch.equal(parent.model.state_dict()[n], child.model.state_dict()[n])
    ]
    assert any("layers.0.self_attn.q_proj" in n for n in changed)  # the merged update
    assert not any("norm" in n for n in changed)  # frozen under LoRA


def test_job_rejected_by_the_gate_publishes_nothing(
    job_env: tuple[UnlearnDeps, FakePool],
) -> None:
    deps, _ = job_env
    params = UnlearnParams.from_dict({**FAST, "max_kl": 1e-12})  # any drift fails
    result = run_job(deps, params, job_id="job-2")
    assert result["status"] == "rejected" and result["gate"]["passed"] is False
    assert deps.store.versions() == ["v0000"] and deps.store.active() == "v0000"


def test_job_with_too_few_records_is_skipped(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = ModelStore(tmp_path / "models", MemoryPointer())
    ensure_initial_version(store, str(tiny_model_dir), 5)
    pool = FakePool(_records(3))
    score_pending(pool, KeywordShareReward("the"), 8)
    deps = UnlearnDeps(store, pool, load_model(tiny_model_dir), KeywordShareReward("the"), "cpu")
    result = run_job(deps, UnlearnParams.from_dict(FAST), job_id="job-3")
    assert result["status"] == "skipped" and "need 10" in result["reason"]


def test_cancelled_job_stops_without_publishing(
    job_env: tuple[UnlearnDeps, FakePool], tmp_path: Path
) -> None:
    deps, _ = job_env
    steps: list[int] = []
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(JobCancelled):
        run_job(
            deps,
            UnlearnParams.from_dict(FAST),
            job_id="job-4",
            progress=lambda e: steps.append(e.get("step", 0)),
            should_stop=lambda: max(steps, default=0) >= 2,
            checkpoint_dir=checkpoint,
        )
    assert deps.store.versions() == ["v0000"] and not checkpoint.exists()


def _suspend_at_step_3(deps: UnlearnDeps, checkpoint: Path, job_id: str) -> None:
    """Run a job until it suspends (checkpointing) at step 3."""
    events: list[dict[str, Any]] = []
    with pytest.raises(JobSuspended):
        run_job(
            deps,
            UnlearnParams.from_dict(FAST),
            job_id=job_id,
            progress=events.append,
            should_suspend=lambda: any(e.get("step") == 3 for e in events),
            checkpoint_dir=checkpoint,
        )


def test_suspended_job_resumes_from_its_checkpoint(
    job_env: tuple[UnlearnDeps, FakePool], tmp_path: Path
) -> None:
    deps, _ = job_env
    checkpoint = tmp_path / "ckpt"
    _suspend_at_step_3(deps, checkpoint, "job-5")
    assert (checkpoint / "resume.json").is_file() and deps.store.versions() == ["v0000"]
    resumed: list[dict[str, Any]] = []
    result = run_job(
        deps,
        UnlearnParams.from_dict(FAST),
        job_id="job-5",
        progress=resumed.append,
        checkpoint_dir=checkpoint,
    )
    assert resumed[0]["resumed"] is True
    assert [e["step"] for e in resumed if "loss" in e] == [4, 5, 6]
    assert "eval_active" not in [e["phase"] for e in resumed]  # the baseline was kept
    assert result["status"] == "published" and not checkpoint.exists()


def test_a_checkpoint_without_per_prompt_rewards_evaluates_the_active_version_again(
    job_env: tuple[UnlearnDeps, FakePool], tmp_path: Path
) -> None:
    deps, _ = job_env
    checkpoint = tmp_path / "ckpt"
    _suspend_at_step_3(deps, checkpoint, "job-7")
    # As an older release wrote it: the baseline has no per-prompt rewards.
    state = json.loads((checkpoint / "resume.json").read_text())
    del state["baseline"]["prompt_rewards"]
    (checkpoint / "resume.json").write_text(json.dumps(state))
    resumed: list[dict[str, Any]] = []
    result = run_job(
        deps,
        UnlearnParams.from_dict(FAST),
        job_id="job-7",
        progress=resumed.append,
        checkpoint_dir=checkpoint,
    )
    phases = [e["phase"] for e in resumed]
    assert phases.index("eval_active") < phases.index("eval_candidate") < phases.index("gate")
    assert result["status"] == "published"
    assert result["gate"]["reward_test"]["n"] == len(result["eval"]["active"]["prompt_rewards"])


def test_a_rollback_during_the_job_is_not_overridden(
    job_env: tuple[UnlearnDeps, FakePool], tiny_qm: QuarkModel
) -> None:
    deps, _ = job_env
    other = deps.store.publish(tiny_qm, {"parent": "v0000"})

    def rollback_midway(event: dict[str, Any]) -> None:
        if event.get("phase") == "gate":
            deps.store.activate(other)

    result = run_job(deps, UnlearnParams.from_dict(FAST), job_id="job-6", progress=rollback_midway)
    assert result["status"] == "stale" and deps.store.active() == other
    assert deps.store.versions() == ["v0000", other]
