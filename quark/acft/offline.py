"""Offline ACFT (``quark train --objective acft``): one round on a prompt file.

Sample the model's default output (no reward token) on the prompts, label each completion
with the reward (C = reward >= threshold), train the auxiliary head, then fine-tune the model
on the accepted completions (optionally mixed with a utility text) with NLL + lambda
KL(q || p_theta), q built from a frozen copy of the starting model. The result is a normal
model directory (no reward tokens added) with the head in ``aux_head/``.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quark.acft.config import ACFTConfig, ObjectiveParams
from quark.acft.corpus import mix_corpus
from quark.acft.training import (
    ACFTTrainer,
    AuxTrainer,
    Example,
    LabelledSample,
    new_head,
    sample_labelled,
)
from quark.config import QuarkConfig
from quark.models import QuarkModel, frozen_copy, load_model
from quark.rewards import RewardFn
from quark.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class OfflineRun:
    """What one offline round needs besides the model and the prompts."""

    reward_fn: RewardFn
    config: ACFTConfig
    sampling: SamplingParams
    samples_per_prompt: int = 1
    generation_batch_size: int = 32
    utility_text: Path | None = None
    utility_fraction: float = 0.25
    metrics_path: Path | None = None


def train_acft(
    qm: QuarkModel,
    prompts: Sequence[str],
    run: OfflineRun,
    out_dir: Path,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """One ACFT round on ``prompts``; saves the model (with ``aux_head/``) into ``out_dir``
    and returns the LLM steps taken (fewer than ``config.steps`` if ``should_stop``)."""
    cfg = run.config
    base = frozen_copy(qm)
    samples = _samples(qm, prompts, run)
    satisfied = sum(s.satisfied for s in samples)
    _write(run, {"event": "samples", "samples": len(samples), "satisfied": satisfied})
    if satisfied == 0:
        raise ValueError(
            f"none of {len(samples)} sampled completions has reward >= {cfg.threshold}: "
            "nothing to fine-tune on (lower --acft-threshold)"
        )
    aux = AuxTrainer(qm, base, new_head(qm, cfg), cfg)
    for _ in range(cfg.aux_steps):
        [stats] = aux.fit(samples, steps=1)
        _write(run, {"event": "aux", "step": aux.step, **stats.as_dict()})
    accepted = [Example(s.prompt, s.completion) for s in samples if s.satisfied]
    corpus = mix_corpus(accepted, run.utility_text, run.utility_fraction, random.Random(cfg.seed))
    trainer = ACFTTrainer(qm, base, aux.head, cfg)
    while trainer.step < cfg.steps and not should_stop():
        [llm] = trainer.fit(corpus, steps=1)
        _write(run, {"event": "train", "step": trainer.step, **llm.as_dict()})
    qm.metadata = {**qm.metadata, "objective": "acft"}
    trainer.save_checkpoint(out_dir)
    return trainer.step


def run_offline(
    model: tuple[str, str],
    config: QuarkConfig,
    objective: ObjectiveParams,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    out: Path,
    utility_text: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """``quark train --objective acft``: load ``model`` (source, device), run
    :func:`train_acft` with ACFT's config from ``objective`` and the shared fields of
    ``config``; the model goes to ``out/model``, the metrics to ``out/metrics.jsonl``."""
    source, device = model
    qm = load_model(source, device=device)
    qm.metadata = {"base_model": source, "task": config.task, "reward": config.reward}
    run = OfflineRun(
        reward_fn,
        objective.acft_config(config),
        SamplingParams(config.response_length, config.temperature, config.top_p),
        samples_per_prompt=config.samples_per_prompt,
        generation_batch_size=config.generation_batch_size,
        utility_text=utility_text,
        metrics_path=out / "metrics.jsonl",
    )
    return train_acft(qm, prompts, run, out / "model", should_stop)


def _samples(qm: QuarkModel, prompts: Sequence[str], run: OfflineRun) -> list[LabelledSample]:
    repeated = [p for p in prompts for _ in range(run.samples_per_prompt)]
    return sample_labelled(
        qm,
        repeated,
        run.reward_fn,
        run.config,
        run.sampling,
        seed=run.config.seed,
        batch_size=run.generation_batch_size,
    )


def _write(run: OfflineRun, record: dict[str, Any]) -> None:
    log.debug("acft %s", record)
    if run.metrics_path is None:
        return
    run.metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with run.metrics_path.open("a") as handle:
        handle.write(json.dumps({"time": time.time(), **record}) + "\n")
