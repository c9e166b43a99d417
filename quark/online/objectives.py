"""The objective selector of the online job: ``params.objective`` picks the job class.

``quark``: :class:`quark.online.job.UnlearnJob` (reward tokens; gate on the top token);
``acft``: :class:`quark.online.acft_job.ACFTJob` (default output; gate on no token).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from quark.online.acft_job import ACFTJob
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
    """One unlearn job of ``params.objective`` (see ``quark.online.job.run_unlearn`` for the
    arguments, the result and the exceptions; both objectives share them)."""
    job = JOBS[params.objective]
    return job(deps, params, job_id, progress, should_stop, should_suspend, checkpoint_dir).run()
