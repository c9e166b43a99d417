"""One unlearn job: load the active version -> take the newest scored pool records (prompts of
a held-out slice excluded) -> evaluate the active version on the held-out prompts -> train
with the Quark loop against the frozen *original* model -> evaluate the candidate ->
promotion gate -> publish + activate, or not. Entry point: :func:`quark.online.objectives.run_job`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from quark.checkpoint import STATE_FILE
from quark.data import utility_passages
from quark.models import QuarkModel, load_model
from quark.online.gate import is_held_out, judged_quantile, promotion_gate
from quark.online.params import UnlearnParams
from quark.online.scoring import OnlinePool, unique_records
from quark.pool import PoolRecord
from quark.precision import bf16_autocast, training_autocast
from quark.rewards import RewardFn
from quark.training import QuarkTrainer
from quark.version_eval import EvalResult, evaluate_version

log = logging.getLogger(__name__)

RESUME_FILE = "resume.json"
Progress = Callable[[dict[str, Any]], None]


class JobCancelled(Exception):
    """The job was cancelled: it stopped without publishing anything."""


class JobSuspended(Exception):
    """The job stopped early (time limit, worker shutdown) after saving a checkpoint;
    running it again with the same checkpoint directory resumes it."""


class NoActiveVersion(RuntimeError):
    """The store has no active version to continue from."""


class VersionStore(Protocol):
    """What a job needs from the model store (``quark.service.store.ModelStore``)."""

    def active(self) -> str | None: ...

    def load(self, version: str, device: str = "auto") -> QuarkModel: ...

    def publish(
        self, qm: QuarkModel, metadata: dict[str, Any], extra_dirs: dict[str, Path] | None = None
    ) -> str: ...

    def aux_head(self, version: str) -> Path | None: ...

    def activate(self, version: str) -> dict[str, Any]: ...

    def prune(self, retention: int) -> list[str]: ...


class HeadStore(Protocol):
    """Where ACFT's parallel scheme keeps auxiliary heads, one per version they were trained
    for (``quark.service.aux_heads.AuxHeads``)."""

    def get(self, version: str) -> Path | None: ...

    def latest(self) -> tuple[str, Path] | None: ...

    def publish(self, version: str, head_dir: Path, metadata: dict[str, Any]) -> Path: ...


def _never() -> bool:
    return False


def _ignore(_: dict[str, Any]) -> None:
    return None


@dataclass
class UnlearnDeps:
    """The job's collaborators; the worker caches the original model and the reward."""

    store: VersionStore
    pool: OnlinePool
    original: QuarkModel  # frozen original model: the KL reference, never a later version
    reward_fn: RewardFn  # the job's reward (also used to evaluate)
    device: str = "auto"
    # The job's reward differs from the one the pool was scored with (an admin override):
    # score the window again with it, in memory.
    rescore: bool = False
    # A plain-text file, a passage per line: ACFT jobs mix its passages into their corpus,
    # Quark jobs add a KL to the original model on them when utility_kl_coef > 0.
    utility_text: Path | None = None
    # ACFT's parallel scheme: the heads the aux task publishes (None: no parallel scheme).
    heads: HeadStore | None = None


@dataclass
class Window:
    train: list[PoolRecord]
    eval_prompts: list[str]
    info: dict[str, Any]


def split_window(records: Sequence[tuple[str, PoolRecord]], params: UnlearnParams) -> Window:
    """Training records and held-out prompts (split by prompt text, never overlapping)."""
    unique = unique_records([r for _, r in records])
    train = [r for r in unique if not is_held_out(r.prompt, params.eval_fraction)]
    held = sorted({r.prompt for _, r in records if is_held_out(r.prompt, params.eval_fraction)})
    eval_prompts = random.Random(params.seed).sample(held, min(len(held), params.eval_prompts))
    info = {
        "records": len(records),
        "train_records": len(train),
        "eval_prompts": len(eval_prompts),
        "first_id": records[0][0] if records else None,
        "last_id": records[-1][0] if records else None,
    }
    return Window(train, eval_prompts, info)


@dataclass
class UnlearnJob:
    """One unlearn job; run by :func:`quark.online.objectives.run_job`."""

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
            raise NoActiveVersion("no active model version: start the server or a worker first")
        resume = _read_resume(self.checkpoint_dir, parent)
        self.progress({"phase": "window", "parent": parent, "resumed": resume is not None})
        if resume is not None:
            window = _resume_window(resume)
        else:
            window = split_window(self._records(), self.params)
            needed = max(self.params.min_records, self.params.num_quantiles)
            if window.info["train_records"] < needed:
                return skipped_result(
                    parent,
                    window,
                    f"only {window.info['train_records']} scored "
                    f"training records in the window (need {needed})",
                )
        if not window.eval_prompts:
            return skipped_result(parent, window, "no held-out prompts in the window")
        qm, trainer, baseline = self._prepare(parent, window, resume)
        self._train(trainer, parent, window, baseline)
        outcome = self._judge(qm, trainer.step, parent, window, baseline)
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
        utility = self._utility_passages()  # before any model work: a missing file fails fast
        if resume is not None and self.checkpoint_dir is not None:
            qm = load_model(self.checkpoint_dir, device=self.deps.device)
            trainer = self._trainer(qm, [], utility)
            trainer.load_state(self.checkpoint_dir)  # restores the window's records too
            trainer.prompts = sorted({r.prompt for r in trainer.pool.records()})
            return qm, trainer, EvalResult(**resume["baseline"])
        qm = self.deps.store.load(parent, device=self.deps.device)
        self.progress({"phase": "eval_active"})
        baseline = self._evaluate(qm, window.eval_prompts)
        self.progress({"phase": "train", "step": 0, "eval_active": baseline.as_dict()})
        torch.manual_seed(self.params.seed)
        prompts = sorted({r.prompt for r in window.train})
        trainer = self._trainer(qm, prompts, utility)
        trainer.pool.add(window.train)
        return qm, trainer, baseline

    def _trainer(
        self, qm: QuarkModel, prompts: Sequence[str], utility: Sequence[str]
    ) -> QuarkTrainer:
        deps = self.deps
        return QuarkTrainer(qm, deps.original.model, deps.reward_fn, prompts, self.params,
                            utility=utility)  # fmt: skip

    def _utility_passages(self) -> list[str]:
        """Passages of the utility text for the utility KL term (none while it is off)."""
        fix = (
            "set QUARK_UTILITY_TEXT to a plain-text file with a passage per line, or set "
            "utility_kl_coef to 0"
        )
        return utility_passages(self.params.utility_kl_coef, self.deps.utility_text, fix)

    def _evaluate(self, qm: QuarkModel, prompts: Sequence[str]) -> EvalResult:
        # In the training precision: bf16 where the CPU has it, as the version will be
        # served (QUARK_DTYPE auto), at about half the cost of a float32 evaluation.
        with training_autocast(bf16_autocast(self.params.train_precision, qm.device)):
            return evaluate_version(
                qm,
                self.deps.original,
                prompts,
                self.deps.reward_fn,
                samples=self.params.eval_samples,
                max_new_tokens=self.params.response_length,
                top_p=self.params.eval_top_p,
                seed=self.params.seed,
                max_prompt_tokens=self.params.max_prompt_tokens,
                quantile=judged_quantile(self.params.objective),
            )

    def _train(
        self, trainer: QuarkTrainer, parent: str, window: Window, baseline: EvalResult
    ) -> None:
        """The training steps (the trainer's loop); any error, a time limit included, leaves
        a resumable checkpoint; a cancellation leaves nothing."""
        try:
            trainer.run(
                self.params.steps - trainer.step,
                should_stop=self._check_interrupted,
                on_event=self._report,
            )
        except JobCancelled:
            drop_checkpoint(self.checkpoint_dir)
            raise
        except Exception:
            if self.checkpoint_dir is not None and trainer.step > 0:
                _save_resume(trainer, self.checkpoint_dir, parent, window, baseline)
            raise

    def _check_interrupted(self) -> bool:
        if self.should_stop():
            raise JobCancelled("cancelled during training")
        if self.should_suspend():
            raise JobSuspended("suspended (time limit or worker shutdown)")
        return False

    def _report(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "explore_start":
            self.progress({"phase": "explore", "step": event["step"]})
        elif kind == "train":
            stats = {k: v for k, v in event.items() if k not in ("event", "seconds")}
            self.progress({"phase": "train", "steps": self.params.steps, **stats})

    def _judge(
        self,
        qm: QuarkModel,
        steps: int,
        parent: str,
        window: Window,
        baseline: EvalResult,
    ) -> dict[str, Any]:
        """Evaluate the candidate, apply the promotion gate, publish when it passes."""
        if not baseline.prompt_rewards:
            # A checkpoint written before evaluations kept per-prompt rewards: the gate pairs
            # prompts, so evaluate the active version again (same prompts, same seed).
            self.progress({"phase": "eval_active", "step": steps})
            active = self.deps.store.load(parent, device=self.deps.device)
            baseline = self._evaluate(active, window.eval_prompts)
            del active
        self.progress({"phase": "eval_candidate", "step": steps})
        candidate = self._evaluate(qm, window.eval_prompts)
        gate = promotion_gate(
            candidate,
            baseline,
            reward_tolerance=self.params.reward_tolerance,
            confidence=self.params.gate_confidence,
            max_perplexity_rise=self.params.max_perplexity_rise,
            max_kl=self.params.max_kl,
        )
        result = {
            "job_id": self.job_id,
            "objective": self.params.objective,
            "parent": parent,
            "window": window.info,
            "eval": {"active": baseline.as_dict(), "candidate": candidate.as_dict()},
            "gate": gate.as_dict(),
            "steps": steps,
            "params": self.params.to_dict(),
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
            "objective": self.params.objective,
            "job_id": self.job_id,
            "config": self.params.to_dict(),
            "data_window": result["window"],
            "eval": result["eval"]["candidate"],
            "eval_parent": result["eval"]["active"],
            "gate": result["gate"],
            **self._extra_metadata(parent),
        }
        version = store.publish(qm, metadata, self._extra_dirs())
        store.activate(version)
        pruned = store.prune(self.params.retention)
        self.progress({"phase": "published", "version": version})
        return {**result, "status": "published", "version": version, "pruned": pruned}

    def _extra_metadata(self, parent: str) -> dict[str, Any]:
        """More metadata of the published version (an ACFT job's auxiliary head)."""
        return {}

    def _extra_dirs(self) -> dict[str, Path]:
        """Subdirectories published with the version (an ACFT job's auxiliary head)."""
        return {}


def skipped_result(parent: str, window: Window, reason: str) -> dict[str, Any]:
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
