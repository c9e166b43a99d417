"""The unlearn job's parameters: Quark's hyper-parameters, the objective selector with ACFT's
own hyper-parameters (``quark.acft.config.ObjectiveParams``), plus the online ones, declared
once.

The service derives its ``QUARK_UNLEARN_*`` settings and the ``POST /admin/unlearn`` request
model from these fields (``quark.service.settings``, ``app.routes.admin_jobs``). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from quark.acft.config import ObjectiveParams
from quark.config import QuarkConfig, param
from quark.online.gate import DEFAULT_CONFIDENCE, DEFAULT_MARGIN, DEFAULT_MAX_KL
from quark.rewards.factory import TASK_DEFAULT_REWARD


@dataclass
class UnlearnParams(QuarkConfig, ObjectiveParams):
    """Everything one unlearn job may be told; ``POST /admin/unlearn`` overrides any field.

    ``objective`` picks the job (``quark.online.job`` or ``quark.online.acft_job``); an ACFT
    job reads the shared fields (steps, batch_size, lr, response_length, explore_prompts, ...)
    and its own ``acft_*`` ones."""

    window: int = param(2000, "Newest scored pool records a job trains on.", ge=1)
    min_records: int = param(50, "A job with fewer scored training records is skipped.", ge=2)
    eval_fraction: float = param(
        0.1, "Share of pool prompts held out of training for evaluation.", ge=0, lt=1,
        env="eval_fraction",
    )  # fmt: skip
    eval_prompts: int = param(
        64, "Held-out prompts per evaluation (the gate's paired test has one pair per prompt).",
        ge=1, env="eval_prompts",
    )  # fmt: skip
    eval_samples: int = param(
        4, "Top-token samples per held-out prompt (averaged per prompt).", ge=1,
        env="eval_samples",
    )  # fmt: skip
    reward_tolerance: float = param(
        DEFAULT_MARGIN, "Non-inferiority margin (reward units): promote only if the lower "
        "confidence bound of the mean per-prompt reward difference, candidate - active, "
        "is >= -this.", ge=0, env="gate_reward_tolerance",
    )  # fmt: skip
    gate_confidence: float = param(
        DEFAULT_CONFIDENCE, "One-sided confidence of that bound (t-interval over the held-out "
        "prompts; 0.5 compares the means).", ge=0.5, lt=1, env="gate_confidence",
    )  # fmt: skip
    max_perplexity_rise: float = param(
        0.25, "Promote if perplexity <= the active version's x (1 + this).", ge=0,
        env="gate_max_perplexity_rise",
    )  # fmt: skip
    max_kl: float = param(
        DEFAULT_MAX_KL, "Promote only if the mean per-token KL to the original model <= this "
        "(caps drift summed over versions; a large value turns it off).", gt=0,
        env="gate_max_kl",
    )  # fmt: skip
    acft_utility_fraction: float = param(
        0.25, "ACFT: share of the fine-tuning corpus drawn from the utility text "
        "(QUARK_UTILITY_TEXT; ignored while that is unset), for fluency.", ge=0, lt=1,
    )  # fmt: skip
    acft_parallel: bool = param(
        False, "ACFT: the parallel scheme. The auxiliary head trains in its own Celery task "
        "(queue 'aux', one head per new version) while LLM jobs run; an LLM job uses the "
        "newest published head and builds q from the version that head was trained for.",
    )  # fmt: skip
    retention: int = param(
        5, "Newest model versions kept (plus active, its parent, v0000).", ge=1,
        env="store_retention",
    )  # fmt: skip

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if self.window < self.num_quantiles:
            yield f"window={self.window} must be >= num_quantiles={self.num_quantiles}"

    @property
    def reward_spec(self) -> str:
        """The reward the job trains and evaluates with: explicit, else the task's default."""
        return reward_spec(self.task, self.reward)


def reward_spec(task: str, reward: str) -> str:
    """The reward spec a job or the scorer uses: explicit, else the task's default."""
    return reward or TASK_DEFAULT_REWARD[task]
