"""Online unlearning as plain functions: score the pool, run one unlearn job, decide triggers.

No Celery and no web code here: the worker's tasks are thin shells that pass ids and keys,
and everything a job needs (store, pool, original model, reward) is handed in, so the unit
tests drive the same code with in-memory fakes.

One unlearn job: load the active version -> take the newest scored pool records (prompts of
a held-out slice excluded) -> evaluate the active version on the held-out prompts -> N steps
of the Quark loss against the frozen *original* model (optionally with fresh top-token
exploration) -> evaluate the candidate -> promotion gate -> publish + activate, or not.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from quark.config import QuarkConfig
from quark.gate import is_held_out, promotion_gate
from quark.models import QuarkModel
from quark.pool import PoolRecord, quantile_stats, quantize
from quark.rewards import TASK_DEFAULT_REWARD, RewardFn
from quark.settings import ServiceSettings
from quark.store import ModelStore

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
__all__ = [
    "JobCancelled",
    "JobSuspended",
    "OnlinePool",
    "UnlearnDeps",
    "UnlearnParams",
    "Window",
    "promotion_gate",
    "run_unlearn",
    "score_pending",
    "trigger_reason",
]


class JobCancelled(Exception):
    """The job was cancelled: it stopped without publishing anything."""


class JobSuspended(Exception):
    """The job stopped early (time limit, worker shutdown) after saving a checkpoint;
    running it again with the same checkpoint directory resumes it."""


class OnlinePool(Protocol):
    """What the online loop needs from the pool (``quark.redis_pool.RedisPool`` in service)."""

    def read_since(self, cursor: str, count: int) -> list[tuple[str, PoolRecord]]: ...

    def get_rewards(self, record_ids: Sequence[str]) -> dict[str, float]: ...

    def set_rewards(self, rewards: Mapping[str, float]) -> None: ...

    def get_cursor(self, name: str) -> str: ...

    def set_cursor(self, name: str, value: str) -> None: ...

    def newest_scored(self, count: int) -> list[tuple[str, PoolRecord]]: ...


# -- scoring ---------------------------------------------------------------------------------
def score_pending(
    pool: OnlinePool, reward_fn: RewardFn, batch_size: int, cursor_name: str = "score"
) -> int:
    """Score every record after the scoring cursor; returns how many got a reward.

    Idempotent: a record that already has a reward is skipped, and the cursor only moves
    after a batch's rewards are stored, so a crash re-reads at most one batch and scores
    nothing twice. Callers serialize concurrent scorers with a lock.
    """
    scored = 0
    cursor = pool.get_cursor(cursor_name)
    while batch := pool.read_since(cursor, batch_size):
        have = pool.get_rewards([r.record_id for _, r in batch])
        todo = _unique([r for _, r in batch if r.record_id not in have and r.reward is None])
        if todo:
            values = reward_fn([r.prompt for r in todo], [r.completion for r in todo])
            rewards = {
                r.record_id: float(v) for r, v in zip(todo, values, strict=True) if math.isfinite(v)
            }
            pool.set_rewards(rewards)
            scored += len(rewards)
        cursor = batch[-1][0]
        pool.set_cursor(cursor_name, cursor)
    return scored


# -- continuous mode -------------------------------------------------------------------------
def trigger_reason(
    now: float,
    last_at: float,
    last_scored: int,
    scored_total: int,
    interval_s: float,
    min_new: int,
) -> str | None:
    """Why continuous mode should start a job now, or None: ``min_new`` new scored records,
    or ``interval_s`` elapsed with at least one new record (retraining on the same data
    would only re-fit it)."""
    new = scored_total - last_scored if scored_total >= last_scored else scored_total
    if new >= min_new:
        return f"{new} new scored records (threshold {min_new})"
    if new > 0 and now - last_at >= interval_s:
        return f"{now - last_at:.0f}s since the last job ({new} new scored records)"
    return None


# -- unlearn job -----------------------------------------------------------------------------
@dataclass(frozen=True)
class UnlearnParams:
    """Everything one job may be told; ``POST /admin/unlearn`` overrides any field."""

    task: str = "toxicity"
    reward: str = ""
    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-5
    warmup_steps: int = 10
    kl_coef: float = 0.05
    entropy_coef: float = 0.06
    num_quantiles: int = 5
    window: int = 2000
    min_records: int = 50
    explore_prompts: int = 0
    sample_interval: int = 50
    response_length: int = 20
    eval_fraction: float = 0.1
    eval_prompts: int = 32
    eval_samples: int = 2
    reward_tolerance: float = 0.0
    max_perplexity_rise: float = 0.25
    max_kl: float | None = None
    retention: int = 5
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> UnlearnParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown unlearn parameters {unknown}; valid: {sorted(known)}")
        params = cls(**values)
        params.quark_config()  # validates ranges with QuarkConfig's checks
        return params

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def quark_config(self) -> QuarkConfig:
        return QuarkConfig(
            task=self.task,
            reward=self.reward,
            num_quantiles=self.num_quantiles,
            kl_coef=self.kl_coef,
            entropy_coef=self.entropy_coef,
            lr=self.lr,
            warmup_steps=min(self.warmup_steps, max(0, self.steps - 1)),
            batch_size=self.batch_size,
            total_steps=self.steps,
            sample_interval=self.sample_interval,
            explore_prompts=max(1, self.explore_prompts),
            response_length=self.response_length,
            seed=self.seed,
        )


# UnlearnParams field -> ServiceSettings field giving its default.
PARAM_SETTINGS = {
    "task": "task",
    "reward": "reward",
    "steps": "unlearn_steps",
    "batch_size": "unlearn_batch_size",
    "lr": "unlearn_lr",
    "warmup_steps": "unlearn_warmup_steps",
    "kl_coef": "unlearn_kl_coef",
    "entropy_coef": "unlearn_entropy_coef",
    "num_quantiles": "num_quantiles",
    "window": "unlearn_window",
    "min_records": "unlearn_min_records",
    "explore_prompts": "unlearn_explore_prompts",
    "sample_interval": "unlearn_sample_interval",
    "response_length": "unlearn_response_length",
    "eval_fraction": "eval_fraction",
    "eval_prompts": "eval_prompts",
    "eval_samples": "eval_samples",
    "reward_tolerance": "gate_reward_tolerance",
    "max_perplexity_rise": "gate_max_perplexity_rise",
    "max_kl": "gate_max_kl",
    "retention": "store_retention",
}


def params_from_settings(settings: ServiceSettings, overrides: Mapping[str, Any]) -> UnlearnParams:
    """The job's parameters: settings as defaults, then the admin's overrides."""
    values = {name: getattr(settings, field) for name, field in PARAM_SETTINGS.items()}
    if "task" in overrides and "reward" not in overrides:
        values["reward"] = ""  # a different task means that task's default reward
    return UnlearnParams.from_dict({**values, **overrides})


def reward_spec(task: str, reward: str) -> str:
    """The reward spec a job or the scorer uses: explicit, else the task's default."""
    return reward or TASK_DEFAULT_REWARD[task]


@dataclass
class UnlearnDeps:
    """The job's collaborators; the worker caches the original model and the reward."""

    store: ModelStore
    pool: OnlinePool
    original: QuarkModel  # frozen original model: the KL reference, never a later version
    reward_fn: RewardFn  # the job's reward (also used to evaluate)
    device: str = "auto"
    # The job's reward differs from the one the pool was scored with (an admin override):
    # score the window again with it, in memory.
    rescore: bool = False


@dataclass
class Window:
    train: list[PoolRecord]
    eval_prompts: list[str]
    info: dict[str, Any]


def _never() -> bool:
    return False


def _ignore(_: dict[str, Any]) -> None:
    return None


def _unique(records: Sequence[PoolRecord]) -> list[PoolRecord]:
    """First copy of each record_id: pool logging is at-least-once (a write that reached
    Redis just before it went away is replayed from the spool), so a record can repeat."""
    seen: set[str] = set()
    out = []
    for record in records:
        if record.record_id not in seen:
            seen.add(record.record_id)
            out.append(record)
    return out


def split_window(records: Sequence[tuple[str, PoolRecord]], params: UnlearnParams) -> Window:
    """Training records and held-out prompts (split by prompt text, never overlapping)."""
    unique = _unique([r for _, r in records])
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


def run_unlearn(
    deps: UnlearnDeps,
    params: UnlearnParams,
    *,
    job_id: str,
    progress: Progress = _ignore,
    should_stop: Callable[[], bool] = _never,
    should_suspend: Callable[[], bool] = _never,
    checkpoint_dir: Path | None = None,
) -> dict[str, Any]:
    """One unlearn job; returns its result (``status``: published, rejected, skipped, stale).

    ``should_stop`` cancels (raises JobCancelled, nothing published); ``should_suspend``
    checkpoints into ``checkpoint_dir`` and raises JobSuspended. A later call with the same
    ``checkpoint_dir`` and the same active version resumes from the checkpoint.
    """
    from quark.unlearn import UnlearnJob  # the job imports this module's types

    job = UnlearnJob(deps, params, job_id, progress, should_stop, should_suspend, checkpoint_dir)
    return job.run()


# -- pool statistics -------------------------------------------------------------------------
def _summary(rewards: Sequence[float]) -> dict[str, Any]:
    if not rewards:
        return {"scored": 0, "mean": None, "min": None, "max": None, "p50": None}
    ordered = sorted(rewards)
    return {
        "scored": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p50": ordered[len(ordered) // 2],
    }


def reward_distribution(records: Sequence[PoolRecord], num_quantiles: int) -> dict[str, Any]:
    """Reward summaries of ``records``: per model version that generated them, per reward
    token they were generated with, and per Quark quantile (how quantize would bin them)."""
    by_version: dict[str, list[PoolRecord]] = {}
    by_token: dict[str, list[PoolRecord]] = {}
    for record in records:
        by_version.setdefault(str(record.metadata.get("model_version")), []).append(record)
        token = record.metadata.get("reward_quantile")
        by_token.setdefault("none" if token is None else str(token), []).append(record)

    def block(group: list[PoolRecord]) -> dict[str, Any]:
        rewards = [r.reward for r in group if r.reward is not None]
        return {"records": len(group), **_summary(rewards)}

    scored = [r for r in records if r.reward is not None]
    quantiles = quantize(scored, num_quantiles) if len(scored) >= num_quantiles else []
    return {
        "by_model_version": {v: block(g) for v, g in sorted(by_version.items())},
        "by_reward_token": {t: block(g) for t, g in sorted(by_token.items())},
        "quantiles": quantile_stats(quantiles, num_quantiles),
    }
