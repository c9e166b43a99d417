"""ACFT's hyper-parameters, declared once with help text and bounds (torch-free).

Kept apart from ``QuarkConfig`` on purpose: the service's objective selector (docs/acft.md)
will decide how the two meet; until then nothing derived from ``QuarkConfig`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from quark.config import Params, param


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
    response_length: int = param(20, "Completion tokens kept per example.", ge=1, le=512)
    max_prompt_tokens: int = param(256, "Prompts longer than N tokens keep their last N.", ge=1)
    seed: int = param(42, "Random seed (batch order).")

    def effective_warmup(self, steps: int) -> int:
        """Warmup never longer than the run."""
        return min(self.warmup_steps, max(0, steps - 1))
