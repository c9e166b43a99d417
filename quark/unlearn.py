"""One unlearn job, step by step (the entry point is :func:`quark.online.run_unlearn`)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from quark.gate import EvalResult, evaluate_version, promotion_gate
from quark.models import QuarkModel, load_model
from quark.online import (
    JobCancelled,
    JobSuspended,
    Progress,
    UnlearnDeps,
    UnlearnParams,
    Window,
    split_window,
)
from quark.pool import PoolRecord
from quark.store import StoreError
from quark.training import STATE_FILE, QuarkTrainer

log = logging.getLogger(__name__)

RESUME_FILE = "resume.json"


@dataclass
class UnlearnJob:
    """One unlearn job; see quark.online.run_unlearn (its entry point)."""

    deps: UnlearnDeps
    params: UnlearnParams
    job_id: str
    progress: Progress
    should_stop: Callable[[], bool]
    should_suspend: Callable[[], bool]
    checkpoint_dir: Path | None

    def run(self) -> dict[str, Any]:
        started = time.time()
        parent = self.deps.store.active()
        if parent is None:
            raise StoreError("no active model version: start the server or a worker first")
        resume = _read_resume(self.checkpoint_dir, parent)
        self.progress({"phase": "window", "parent": parent, "resumed": resume is not None})
        if resume is not None:
            window = _resume_window(resume)
        else:
            window = split_window(self._records(), self.params)
            needed = max(self.params.min_records, self.params.num_quantiles)
            if window.info["train_records"] < needed:
                return _skipped(
                    parent,
                    window,
                    f"only {window.info['train_records']} scored "
                    f"training records in the window (need {needed})",
                )
        if not window.eval_prompts:
            return _skipped(parent, window, "no held-out prompts in the window")
        qm, trainer, baseline = self._prepare(parent, window, resume)
        self._train(trainer, parent, window, baseline)
        outcome = self._judge(qm, trainer, parent, window, baseline)
        drop_checkpoint(self.checkpoint_dir)
        outcome["seconds"] = time.time() - started
        return outcome

    def _records(self) -> list[tuple[str, PoolRecord]]:
        records = self.deps.pool.newest_scored(self.params.window)
        if self.deps.rescore and records:
            rewards = self.deps.reward_fn(
                [r.prompt for _, r in records], [r.completion for _, r in records]
            )
            records = [
                (i, replace(r, reward=float(v)))
                for (i, r), v in zip(records, rewards, strict=True)
                if math.isfinite(v)
            ]
        return records

    def _prepare(
        self, parent: str, window: Window, resume: dict[str, Any] | None
    ) -> tuple[QuarkModel, QuarkTrainer, EvalResult]:
        """Policy (active version or checkpoint), trainer, and the active version's eval."""
        self.progress({"phase": "load", "parent": parent})
        config = self.params.quark_config()
        if resume is not None and self.checkpoint_dir is not None:
            qm = load_model(self.checkpoint_dir, device=self.deps.device)
            trainer = QuarkTrainer(qm, self.deps.original.model, self.deps.reward_fn, [], config)
            trainer.load_state(self.checkpoint_dir)  # restores the window's records too
            trainer.prompts = sorted({r.prompt for r in trainer.pool.records()})
            return qm, trainer, EvalResult(**resume["baseline"])
        qm = self.deps.store.load(parent, device=self.deps.device)
        self.progress({"phase": "eval_active"})
        baseline = self._evaluate(qm, window.eval_prompts)
        self.progress({"phase": "train", "step": 0, "eval_active": baseline.as_dict()})
        torch.manual_seed(self.params.seed)
        prompts = sorted({r.prompt for r in window.train})
        trainer = QuarkTrainer(qm, self.deps.original.model, self.deps.reward_fn, prompts, config)
        trainer.pool.add(window.train)
        return qm, trainer, baseline

    def _evaluate(self, qm: QuarkModel, prompts: Sequence[str]) -> EvalResult:
        return evaluate_version(
            qm,
            self.deps.original,
            prompts,
            self.deps.reward_fn,
            samples=self.params.eval_samples,
            max_new_tokens=self.params.response_length,
            seed=self.params.seed,
        )

    def _train(
        self, trainer: QuarkTrainer, parent: str, window: Window, baseline: EvalResult
    ) -> None:
        """The training steps; any error (time limit included) leaves a resumable checkpoint."""
        try:
            if self.params.explore_prompts and trainer.step == 0:
                self.progress({"phase": "explore", "step": 0})
                trainer.explore(quantile=0)
            while trainer.step < self.params.steps:
                if self.should_stop():
                    raise JobCancelled("cancelled during training")
                if self.should_suspend():
                    raise JobSuspended(f"suspended at step {trainer.step}")
                self._step(trainer)
        except JobCancelled:
            drop_checkpoint(self.checkpoint_dir)
            raise
        except Exception:
            if self.checkpoint_dir is not None and trainer.step > 0:
                _save_resume(trainer, self.checkpoint_dir, parent, window, baseline)
            raise

    def _step(self, trainer: QuarkTrainer) -> None:
        step, params = trainer.step, self.params
        if params.explore_prompts and step > 0 and step % params.sample_interval == 0:
            self.progress({"phase": "explore", "step": step})
            trainer.explore(quantile=0)
        stats = trainer.train_step()
        self.progress(
            {
                "phase": "train",
                "step": trainer.step,
                "steps": params.steps,
                **stats.as_dict(),
                "lr": trainer.scheduler.get_last_lr()[0],
            }
        )

    def _judge(
        self,
        qm: QuarkModel,
        trainer: QuarkTrainer,
        parent: str,
        window: Window,
        baseline: EvalResult,
    ) -> dict[str, Any]:
        """Evaluate the candidate, apply the promotion gate, publish when it passes."""
        self.progress({"phase": "eval_candidate", "step": trainer.step})
        candidate = self._evaluate(qm, window.eval_prompts)
        gate = promotion_gate(
            candidate,
            baseline,
            reward_tolerance=self.params.reward_tolerance,
            max_perplexity_rise=self.params.max_perplexity_rise,
            max_kl=self.params.max_kl,
        )
        result = {
            "job_id": self.job_id,
            "parent": parent,
            "window": window.info,
            "eval": {"active": baseline.as_dict(), "candidate": candidate.as_dict()},
            "gate": gate.as_dict(),
            "steps": trainer.step,
            "params": self.params.as_dict(),
        }
        self.progress({"phase": "gate", **gate.as_dict(), "eval": result["eval"]})
        if not gate.passed:
            log.info("unlearn job %s: gate refused the candidate: %s", self.job_id, gate.reasons)
            return {**result, "status": "rejected", "version": None}
        if self.should_stop():
            raise JobCancelled("cancelled before publishing")
        return self._publish(qm, parent, result)

    def _publish(self, qm: QuarkModel, parent: str, result: dict[str, Any]) -> dict[str, Any]:
        store = self.deps.store
        if store.active() != parent:
            # An admin activated another version meanwhile (a rollback): do not override it.
            return {**result, "status": "stale", "version": None}
        self.progress({"phase": "publish"})
        metadata = {
            "parent": parent,
            "kind": "unlearn",
            "job_id": self.job_id,
            "config": self.params.as_dict(),
            "data_window": result["window"],
            "eval": result["eval"]["candidate"],
            "eval_parent": result["eval"]["active"],
            "gate": result["gate"],
        }
        version = store.publish(qm, metadata)
        store.activate(version)
        pruned = store.prune(self.params.retention)
        self.progress({"phase": "published", "version": version})
        return {**result, "status": "published", "version": version, "pruned": pruned}


def _skipped(parent: str, window: Window, reason: str) -> dict[str, Any]:
    log.info("unlearn job skipped: %s", reason)
    return {"status": "skipped", "reason": reason, "parent": parent, "window": window.info}


# -- checkpoints -----------------------------------------------------------------------------
def _save_resume(
    trainer: QuarkTrainer,
    directory: Path,
    parent: str,
    window: Window,
    baseline: EvalResult,
) -> None:
    trainer.save_checkpoint(directory)
    state = {
        "parent": parent,
        "window": window.info,
        "eval_prompts": window.eval_prompts,
        "baseline": baseline.as_dict(),
    }
    tmp = directory / f".{RESUME_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(directory / RESUME_FILE)
    log.info("checkpointed unlearn job at step %d in %s", trainer.step, directory)


def _read_resume(directory: Path | None, parent: str) -> dict[str, Any] | None:
    """The checkpoint's state if it continues from ``parent``; stale ones are dropped."""
    if directory is None or not (directory / RESUME_FILE).is_file():
        return None
    if not (directory / STATE_FILE).is_file():
        return None
    state = dict(json.loads((directory / RESUME_FILE).read_text()))
    if state.get("parent") != parent:
        log.info("dropping checkpoint of %s: the active version is now %s", state["parent"], parent)
        drop_checkpoint(directory)
        return None
    return state


def _resume_window(state: dict[str, Any]) -> Window:
    # The training records come back with the trainer's pool; only the split is needed here.
    return Window([], list(state["eval_prompts"]), dict(state["window"]))


def drop_checkpoint(directory: Path | None) -> None:
    """Delete a job's checkpoint (nothing will resume it)."""
    if directory is not None and directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
