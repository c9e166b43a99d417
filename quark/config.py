"""Algorithm configuration: every hyper-parameter declared once, with its help text and bounds.

``QuarkConfig`` is the one declaration of Quark's hyper-parameters. The online unlearn job
extends it (``quark.online.params.UnlearnParams``), and everything else is derived from the
fields: ``quark train`` flags, the ``QUARK_UNLEARN_*`` settings, the admin request model.
A new parameter is one ``param(...)`` line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Self, get_type_hints

TASKS = ("toxicity", "sentiment", "repetition")
QUANTILE_SCOPES = ("pool", "prompt")
TRAIN_QUANTILES = ("all", "extremes", "best")
TOKEN_INITS = ("random", "mean")
TRAIN_PRECISIONS = ("auto", "float32", "bfloat16")
#: What an unlearn job optimises: Quark (reward tokens) or ACFT (the default output).
OBJECTIVES = ("quark", "acft")

#: Default of ``novelty_min_holders``: pooled completions that must share a 3-gram before the
#: novelty term counts it against a sample (docs/results.md, ablation 16).
NOVELTY_MIN_HOLDERS = 5

#: Field metadata keys that bound a number (pydantic's names, so models can reuse them).
BOUNDS = ("ge", "gt", "le", "lt")


def param(default: Any, help: str, **meta: Any) -> Any:
    """A config field: ``help`` for flags, settings and the API docs; ``ge``/``gt``/``le``/``lt``
    bound numbers (checked here and by every model derived from the field); ``env`` names
    the service setting when it is not ``QUARK_UNLEARN_<NAME>``."""
    return field(default=default, metadata={"help": help, **meta})


def check_bounds(name: str, value: Any, meta: dict[str, Any]) -> Iterator[str]:
    """Problems of one field's value against its declared bounds."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{name}={value} must be a finite number"
        return
    checks = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for key, (ok, sign) in checks.items():
        if key in meta and not ok(value, meta[key]):
            yield f"{name}={value} must be {sign} {meta[key]}"


@dataclass
class Params:
    """Validation, (de)serialisation and introspection shared by the config dataclasses."""

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def problems(self) -> Iterator[str]:
        for f in fields(self):
            value = getattr(self, f.name)
            yield from check_bounds(f.name, value, dict(f.metadata))
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                yield f"{f.name}={value!r} is unknown; use one of {', '.join(map(str, choices))}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; valid: {sorted(known)}")
        return cls(**values)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Resolved annotations of the fields (the module uses postponed annotations)."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls)}


def train_precision_param() -> Any:
    """The ``train_precision`` field, declared once for QuarkConfig and ACFTConfig."""
    return param(
        "auto",
        "Precision of the training forwards and backwards on CPU, and of Quark's exploration "
        "and an unlearn job's evaluations: 'bfloat16' (autocast; the "
        "weights, AdamW and the losses stay float32), 'float32', or 'auto' = bfloat16 where "
        "the CPU computes it natively (avx512_bf16, amx_bf16, Arm bf16), else float32. On this "
        "project's CPUs bf16 makes a step 2-3x cheaper, and 30 minutes of it unlearn more than "
        "30 of float32 (docs/results.md, ablation 5). Models on CUDA train in float32.",
        choices=TRAIN_PRECISIONS,
    )


@dataclass
class QuarkConfig(Params):
    """Hyper-parameters of Quark, for ``quark train`` and every online unlearn job.

    Defaults follow the paper (Lu et al. 2022) except where docs/results.md says why not.
    """

    task: str = param("toxicity", f"What to unlearn: one of {', '.join(TASKS)}.", env="task")
    reward: str = param(
        "",
        "Reward spec (see quark.rewards.build_reward); empty = the task's default.",
        env="reward",
    )
    num_quantiles: int = param(
        5, "K: reward quantiles, one reward token each (paper: 5).", ge=2, env="num_quantiles"
    )
    steps: int = param(100, "Training steps (of one job, or of a `quark train` run).", ge=1)
    batch_size: int = param(8, "Quantized pool samples per training step.", ge=1, le=4096)
    lr: float = param(
        8.5e-5,
        "AdamW learning rate after warmup (paper: 1e-5 for GPT2-L; 8.5e-5 over three seeds: "
        "docs/results.md, ablation 9).",
        gt=0,
    )
    warmup_steps: int = param(10, "Linear learning-rate warmup steps.", ge=0)
    weight_decay: float = param(0.0, "AdamW weight decay.", ge=0)
    max_grad_norm: float = param(1.0, "Gradient clipping norm.", gt=0)
    kl_coef: float = param(
        0.05,
        "beta: weight of the per-token KL(pi_theta || pi_ref) (0.1 kept WikiText closer with the "
        "same effect in one run: docs/results.md, ablation 10).",
        ge=0,
    )
    entropy_coef: float = param(
        0.06,
        "alpha: weight of the entropy bonus (subtracted; 0.12 raises dist-3 only by making the "
        "text noise: docs/results.md, ablation 10).",
        ge=0,
    )
    # -- holding the general distribution (docs/results.md, "A utility KL term") -----------
    utility_kl_coef: float = param(
        0.0,
        "Weight of a KL(pi_theta || pi_ref) over every token of utility-text passages (`quark "
        "train --utility-text`, QUARK_UTILITY_TEXT), the policy with the top reward token, the "
        "reference without; meant to hold the distribution beyond the pooled completions (30 "
        "minutes of Quark raised held-out WikiText perplexity 3.4x, docs/results.md). 0 = off: "
        "at coefficient 1 it held WikiText and also took back most of the effect (ablation 5).",
        ge=0,
    )
    utility_rows: int = param(
        2, "Utility passages per training step for the utility KL (0 = none).", ge=0, le=4096
    )
    utility_tokens: int = param(
        64, "Tokens kept from the start of each utility passage.", ge=8, le=1024
    )
    explore_prompts: int = param(
        256,
        "Prompts sampled per exploration round (offline: from the prompt file; online: from "
        "the job's training prompts). 0 = no exploration (online: traffic only). 256, not "
        "the paper's full pass: best-only training needs a pool of 1,000+ samples "
        "(docs/results.md, ablation 3).",
        ge=0,
    )
    sample_interval: int = param(
        25,
        "Explore again (top reward token) every N steps. 25, not 50: the best quantile is "
        "refreshed twice as often, so it is memorised less (the same detox effect with dist-3 "
        "0.945 against 0.902, docs/results.md, ablation 7); 15 is more diverse still but its "
        "completions are more perplexing and the effect smaller (ablation 11).",
        ge=1,
    )
    round_epochs: int = param(
        0,
        "Explore early once a round has made N passes over its training samples (0 = off: "
        "every sample_interval steps only). With 1, no sample is trained on twice between two "
        "exploration rounds, so the first rounds' small best quantile is not memorised "
        "(docs/results.md, ablation 12).",
        ge=0,
    )
    samples_per_prompt: int = param(1, "Completions per prompt in each exploration round.", ge=1)
    response_length: int = param(20, "Maximum new tokens per sampled completion.", ge=1, le=512)
    max_prompt_tokens: int = param(
        256,
        "Prompts longer than N tokens keep their last N (the end a completion continues; a "
        "pooled chat prompt ends with the assistant header) in training and evaluation.",
        ge=1,
    )
    temperature: float = param(1.0, "Sampling temperature while exploring.", gt=0)
    top_p: float = param(1.0, "Nucleus sampling while exploring (paper: 1.0).", gt=0, le=1)
    eval_top_p: float = param(0.9, "Nucleus sampling when evaluating (paper: 0.9).", gt=0, le=1)
    pool_max_size: int | None = param(
        None, "Keep only the newest N pool records (None = all, as in the paper).", ge=1
    )
    generation_batch_size: int = param(32, "Prompts per batched generate call.", ge=1)
    # -- where the learning signal comes from and where compute goes (docs/results.md) ------
    quantile_scope: str = param(
        "pool",
        "Rank samples into quantiles by reward over the whole pool ('pool', the paper) or by "
        "reward minus the mean reward of the same prompt's samples ('prompt').",
        choices=QUANTILE_SCOPES,
    )
    novelty_coef: float = param(
        0.1,
        "Weight of a novelty term in the quantile ranking: each sample ranks by its reward "
        "minus novelty_coef x the share of its completion's word 3-grams that at least "
        "novelty_min_holders pooled completions hold, so the best quantile prefers clean text "
        "the pool does not already repeat (0 = off, the paper; 0.1 met every toxic-half target at "
        "seeds 1, 2 and 42, where the ranking by reward alone misses dist-3 at seed 1: "
        "docs/results.md, ablations 16 and 17).",
        ge=0,
    )
    novelty_min_holders: int = param(
        NOVELTY_MIN_HOLDERS,
        "Pooled completions (itself included) that must hold a 3-gram for the novelty term to "
        "count it. 5: the original model's samples have 2% of their 3-grams that common, a "
        "memorised template most of its; 2 (any repeat) also ranks the odd text of the "
        "sampling tail first (docs/results.md, ablation 16).",
        ge=2,
    )
    explore_focus: float = param(
        0.0,
        "Share of each exploration round's prompts drawn, weighted by toxicity (1 - mean "
        "reward of their pooled samples), from prompts already in the pool (0 = uniform).",
        ge=0,
        le=1,
    )
    train_quantiles: str = param(
        "best",
        "Which quantiles train: 'all' (the paper), 'extremes' (best and worst only) or 'best' "
        "(the best only, as AlpacaFarm's variant; the default: in 30 CPU-minutes it is the "
        "one that moves the judged toxicity, docs/results.md, ablation 3).",
        choices=TRAIN_QUANTILES,
    )
    token_lr: float | None = param(
        None, "Learning rate of the reward tokens' embedding rows (None = lr).", gt=0
    )
    token_init: str = param(
        "random",
        "New reward-token embeddings: 'random' (N(mean, std) of the vocabulary, per dim) or "
        "'mean' (the mean embedding: no random prefix at the start).",
        choices=TOKEN_INITS,
    )
    freeze_layers: int = param(0, "Freeze the lowest N transformer blocks.", ge=0)
    lora_rank: int = param(
        0,
        "Train rank-r adapters (LoRA) on every linear of the transformer blocks, and of the "
        "embeddings only the reward tokens' rows, instead of all weights; 0 = full "
        "fine-tuning. Saved models have the adapters merged in.",
        ge=0,
    )
    lora_alpha: float = param(32.0, "LoRA's alpha: the update is scaled by alpha / rank.", gt=0)
    train_precision: str = train_precision_param()
    reference_cache_mb: int = param(
        2048,
        "MiB kept of the reference model's logits for trained samples (3.9 MiB per 20-token "
        "completion with SmolLM2's vocabulary), reused when a sample is trained on again "
        "instead of a reference forward per step; 0 = recompute every step.",
        ge=0,
    )
    seed: int = param(42, "Random seed.")

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if self.task not in TASKS:
            yield f"task={self.task!r} is unknown; use one of {', '.join(TASKS)}"
        if self.pool_max_size is not None and self.pool_max_size < self.num_quantiles:
            yield f"pool_max_size={self.pool_max_size} must be None or >= num_quantiles"
        if self.lora_rank and self.freeze_layers:
            yield "lora_rank and freeze_layers do not combine (LoRA freezes every base weight)"
        if self.lora_rank and self.weight_decay:
            yield (
                "lora_rank needs weight_decay=0: AdamW's decay would shrink every embedding "
                "row, where LoRA trains only the reward tokens' rows"
            )

    def effective_warmup(self) -> int:
        """Warmup never longer than the run (5 steps with 10 warmup steps would never train)."""
        return min(self.warmup_steps, max(0, self.steps - 1))
