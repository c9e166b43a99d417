"""ACFT's hyper-parameters, declared once with help text and bounds (torch-free).

``ACFTConfig`` is the algorithm's own configuration. ``ObjectiveParams`` is the selector
(``objective``: quark or acft) plus the ACFT hyper-parameters an operator tunes, each derived
from its ``ACFTConfig`` field (``acft_<name>``, same default, bounds and help). The online
job's parameters and ``quark train`` inherit it, so ``--objective``/``--acft-kl-coef``, the
``QUARK_OBJECTIVE``/``QUARK_UNLEARN_ACFT_*`` settings and the ``POST /admin/unlearn`` fields
all come from these declarations. The rest of ACFT's fields (steps, batch size, learning
rate, ...) are shared with Quark's (``QuarkConfig``): :meth:`ObjectiveParams.acft_config`.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from quark.config import OBJECTIVES, Params, param, train_precision_param


@dataclass
class ACFTConfig(Params):
    """Attribute-controlled fine-tuning (Meng et al. 2024) with a NADO auxiliary model
    (Meng et al. 2022). Defaults are ours unless the help text names a source."""

    threshold: float = param(
        0.5, "Constraint C(x) = 1 iff the reward of the completion >= this (non-toxic)."
    )
    # -- the auxiliary model R (NADO) ---------------------------------------------------------
    aux_rank: int = param(64, "r: width of the auxiliary head H -> r -> V.", ge=1, le=4096)
    aux_steps: int = param(60, "Optimizer steps of the auxiliary head per round.", ge=1)
    aux_batch_size: int = param(16, "Labelled samples per auxiliary step.", ge=1, le=4096)
    aux_lr: float = param(1e-2, "AdamW learning rate of the auxiliary head.", gt=0)
    aux_cache_samples: int = param(
        16384,
        "Samples whose frozen base-model hidden states are kept in memory, so the head's "
        "epochs after the first skip the base model's forward (H x completion tokens floats "
        "each: 46 KB for SmolLM2-135M; 0 = no cache).",
        ge=0,
    )
    consistency_coef: float = param(
        1.0,
        "Weight of NADO's consistency regulariser sum_v p(v|x<=t) R(x<=t, v) = R(x<t, x_t) "
        "(official GPT-2 code: 1.0).",
        ge=0,
    )
    # -- fine-tuning the LLM ------------------------------------------------------------------
    steps: int = param(100, "Optimizer steps of the LLM per round.", ge=1)
    batch_size: int = param(8, "Corpus examples per LLM step.", ge=1, le=4096)
    lr: float = param(5e-5, "AdamW learning rate of the LLM after warmup.", gt=0)
    warmup_steps: int = param(10, "Linear learning-rate warmup steps (both optimizers).", ge=0)
    weight_decay: float = param(0.0, "AdamW weight decay (both optimizers).", ge=0)
    max_grad_norm: float = param(1.0, "Gradient clipping norm (both optimizers).", gt=0)
    kl_coef: float = param(
        1.0, "lambda: weight of the per-token KL(q || p_theta) added to the corpus NLL.", ge=0
    )
    # -- data -----------------------------------------------------------------------------------
    train_precision: str = train_precision_param()
    response_length: int = param(20, "Completion tokens kept per example.", ge=1, le=512)
    max_prompt_tokens: int = param(256, "Prompts longer than N tokens keep their last N.", ge=1)
    seed: int = param(42, "Random seed (batch order).")

    def effective_warmup(self, steps: int) -> int:
        """Warmup never longer than the run."""
        return min(self.warmup_steps, max(0, steps - 1))


_ACFT_FIELDS = {f.name: f for f in fields(ACFTConfig)}
#: ACFTConfig fields that ObjectiveParams exposes as ``acft_<name>``; the others are shared
#: with QuarkConfig under the same name (see ObjectiveParams.acft_config).
ACFT_OWN = ("threshold", "kl_coef", "aux_steps", "aux_rank", "aux_batch_size", "aux_lr",
            "consistency_coef")  # fmt: skip


def acft_param(name: str) -> Any:
    """The ``acft_<name>`` field: the ACFTConfig field's default, bounds and help text."""
    source = _ACFT_FIELDS[name]
    if source.default is MISSING:
        raise ValueError(f"ACFTConfig.{name} has no default")
    meta = {k: v for k, v in source.metadata.items() if k != "help"}
    return param(source.default, f"ACFT: {source.metadata['help']}", **meta)


@dataclass
class ObjectiveParams(Params):
    """The objective selector and ACFT's own hyper-parameters (used when objective=acft)."""

    objective: str = param(
        "quark",
        "What a job optimises: 'quark' (reward tokens: the clean output needs the top token) "
        "or 'acft' (attribute-controlled fine-tuning: the default, no-token output becomes "
        "clean; the promotion gate then judges the no-token output).",
        choices=OBJECTIVES,
        env="objective",
    )
    acft_threshold: float = acft_param("threshold")
    acft_kl_coef: float = acft_param("kl_coef")
    acft_aux_steps: int = acft_param("aux_steps")
    acft_aux_rank: int = acft_param("aux_rank")
    acft_aux_batch_size: int = acft_param("aux_batch_size")
    acft_aux_lr: float = acft_param("aux_lr")
    acft_consistency_coef: float = acft_param("consistency_coef")

    def acft_config(self, shared: object | None = None) -> ACFTConfig:
        """ACFTConfig: the ``acft_*`` fields, the others from the same-named fields of
        ``shared`` (default: this object; QuarkConfig's steps, batch_size, lr, ...) where it
        has them, else ACFTConfig's defaults."""
        source = self if shared is None else shared
        values = {name: getattr(self, f"acft_{name}") for name in ACFT_OWN}
        for name in _ACFT_FIELDS:
            if name not in values and hasattr(source, name):
                values[name] = getattr(source, name)
        return ACFTConfig(**values)
