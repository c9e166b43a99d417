"""Algorithm configuration: the Quark paper's defaults, one help text per field."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

TASKS = ("toxicity", "sentiment", "repetition")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class QuarkConfig:
    """Hyper-parameters of one Quark run (defaults follow the paper and its official code)."""

    task: str = _f("toxicity", f"What to unlearn: one of {', '.join(TASKS)}.")
    reward: str = _f("", "Reward spec (see quark.rewards.build_reward); empty = task default.")
    num_quantiles: int = _f(5, "K: number of reward quantiles, one reward token each.")
    kl_coef: float = _f(0.05, "beta: weight of the per-token KL(pi_theta || pi_ref) penalty.")
    entropy_coef: float = _f(0.06, "alpha: weight of the entropy bonus (subtracted from the loss).")
    lr: float = _f(1e-5, "AdamW learning rate after warmup.")
    warmup_steps: int = _f(100, "Linear learning-rate warmup steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    batch_size: int = _f(8, "Training batch size (pool samples per step).")
    total_steps: int = _f(1000, "Training steps.")
    sample_interval: int = _f(100, "Explore again with the top reward token every N steps.")
    samples_per_prompt: int = _f(1, "Completions sampled per prompt in each exploration round.")
    explore_prompts: int = _f(256, "Prompts sampled (from the prompt set) per exploration round.")
    response_length: int = _f(20, "Maximum new tokens per completion.")
    max_prompt_tokens: int = _f(64, "Prompts are cut to their first N tokens.")
    temperature: float = _f(1.0, "Sampling temperature during exploration.")
    top_p: float = _f(1.0, "Nucleus sampling during exploration (paper: 1.0 in training).")
    eval_top_p: float = _f(0.9, "Nucleus sampling at evaluation (paper: 0.9).")
    pool_max_size: int | None = _f(
        None, "Keep only the newest N pool records (None = all, as in the paper)."
    )
    generation_batch_size: int = _f(32, "Prompts per batched generate call.")
    seed: int = _f(42, "Random seed.")

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid QuarkConfig: " + "; ".join(problems))

    def _problems(self) -> Any:
        if self.task not in TASKS:
            yield f"task={self.task!r} is unknown; use one of {', '.join(TASKS)}"
        positive_ints = (
            "num_quantiles batch_size total_steps sample_interval samples_per_prompt "
            "explore_prompts response_length max_prompt_tokens generation_batch_size"
        )
        for name in positive_ints.split():
            if int(getattr(self, name)) < 1:
                yield f"{name}={getattr(self, name)} must be >= 1"
        if self.num_quantiles < 2:
            yield "num_quantiles must be >= 2 so there is a best and a worst token (paper: 5)"
        for name in ("kl_coef", "entropy_coef", "weight_decay", "warmup_steps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                yield f"{name}={value} must be a finite number >= 0"
        if not (math.isfinite(self.lr) and self.lr > 0):
            yield f"lr={self.lr} must be > 0 (paper: 1e-5)"
        if not self.max_grad_norm > 0:
            yield f"max_grad_norm={self.max_grad_norm} must be > 0"
        if not self.temperature > 0:
            yield f"temperature={self.temperature} must be > 0"
        for name in ("top_p", "eval_top_p"):
            if not 0 < getattr(self, name) <= 1:
                yield f"{name}={getattr(self, name)} must be in (0, 1]"
        if self.pool_max_size is not None and self.pool_max_size < self.num_quantiles:
            yield f"pool_max_size={self.pool_max_size} must be None or >= num_quantiles"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuarkConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown QuarkConfig fields {unknown}; valid: {sorted(known)}")
        return cls(**values)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}
