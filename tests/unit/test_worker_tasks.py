"""worker.tasks' retry decisions, with a fake runtime and task (no broker, no model)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import quark.online.objectives as objectives
import worker.tasks as tasks
from quark.online.job import JobSuspended


class Retried(Exception):
    pass


class FakeTask:
    def __init__(self, retries: int, max_retries: int) -> None:
        self.request = SimpleNamespace(retries=retries)
        self.max_retries = max_retries

    def update_state(self, **_: Any) -> None:
        pass

    def retry(self, exc: BaseException, countdown: float) -> Retried:
        return Retried(str(exc))


def _fake_runtime(data_dir: Path) -> Any:
    return SimpleNamespace(
        settings=SimpleNamespace(
            data_dir=data_dir,
            job_soft_time_limit_s=60,
            unlearn_params=lambda _: SimpleNamespace(reward_spec="spec"),
        ),
        jobs=SimpleNamespace(set_progress=lambda *_: None, mark_started=lambda _: None),
        pool=SimpleNamespace(stats=lambda: {"scored": 0}),
        score=lambda blocking_s: 0,
        ensure_active=lambda: "v0000",
    )


def _failing_job(error: BaseException) -> Any:
    def run(*_: Any, checkpoint_dir: Path, **__: Any) -> dict[str, Any]:
        checkpoint_dir.mkdir(parents=True)  # what a suspended job leaves behind
        (checkpoint_dir / "resume.json").write_text("{}")
        raise error

    return run


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(tasks, "job_deps", lambda *_: None)
    return monkeypatch


@pytest.mark.parametrize(
    ("retries", "error", "raised", "checkpoint_kept"),
    [
        (0, JobSuspended("soft limit"), Retried, True),  # the retry resumes from it
        (3, JobSuspended("soft limit"), JobSuspended, False),  # out of retries
        (0, RuntimeError("boom"), RuntimeError, False),  # a failed job id never runs again
    ],
)
def test_checkpoint_is_kept_only_for_a_retry(
    patched: pytest.MonkeyPatch,
    tmp_path: Path,
    retries: int,
    error: BaseException,
    raised: type[BaseException],
    checkpoint_kept: bool,
) -> None:
    patched.setattr(objectives, "run_job", _failing_job(error))
    with pytest.raises(raised):
        tasks._run_locked(FakeTask(retries, max_retries=3), _fake_runtime(tmp_path), "job-1", {})  # type: ignore[arg-type]
    assert (tmp_path / "checkpoints" / "job-1").exists() == checkpoint_kept
