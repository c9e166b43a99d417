"""The objective selector of the online job: ``params.objective`` picks the job class.

``quark``: :class:`quark.online.job.UnlearnJob` (reward tokens; gate on the top token);
``acft``: :class:`quark.online.acft_job.ACFTJob` (default output; gate on no token).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from quark.online.acft_job import ACFTJob
from quark.online.aux_job import AuxJob
from quark.online.job import Progress, UnlearnDeps, UnlearnJob, _ignore, _never
from quark.online.params import UnlearnParams

JOBS: dict[str, type[UnlearnJob]] = {"quark": UnlearnJob, "acft": ACFTJob}


def run_job(
    deps: UnlearnDeps,
    params: UnlearnParams,
    *,
    job_id: str,
    progress: Progress = _ignore,
    should_stop: Callable[[], bool] = _never,
    should_suspend: Callable[[], bool] = _never,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """One unlearn job of ``params.objective``; returns its result (``status``: published,
    rejected, skipped, stale).

    ``should_stop`` cancels (raises JobCancelled, nothing published); ``should_suspend``
    checkpoints into ``checkpoint_dir`` and raises JobSuspended. A later call with the same
    ``checkpoint_dir`` and the same active version resumes from the checkpoint.
    """
    job = JOBS[params.objective]
    return job(deps, params, job_id, progress, should_stop, should_suspend, checkpoint_dir).run()


def run_aux_job(
    deps: UnlearnDeps,
    params: UnlearnParams,
    *,
    job_id: str,
    progress: Progress = _ignore,
    should_stop: Callable[[], bool] = _never,
    should_suspend: Callable[[], bool] = _never,
) -> dict[str, Any]:
    """ACFT's parallel scheme: train and publish the active version's auxiliary head
    (``quark.online.aux_job``); returns its result (``status``: published, skipped).
    ``should_stop`` cancels and ``should_suspend`` interrupts (JobCancelled / JobSuspended,
    nothing published, no checkpoint: the job is short and a re-run starts over)."""
    return AuxJob(deps, params, job_id, progress, should_stop, should_suspend, None).run()
