"""One ACFT unlearn job (``objective=acft``): one round of the paper's iteration, in sequence.

active version -> window of scored pool records (held-out prompts excluded) -> evaluate the
active version's *default* output (no reward token) -> labelled samples of the active version
without a reward token (its no-token pool records plus fresh samples of the training
prompts), labelled C = reward >= threshold -> train the auxiliary head R (NADO), warm-started
from the parent's head when it has one -> fine-tune the LLM with NLL + lambda KL(q || p_theta)
on the corpus (accepted pool completions, optionally mixed with a utility text) -> evaluate
the candidate's default output -> the same promotion gate -> publish with ``aux_head/``.

The base of q (``p_base``) is a frozen snapshot of the active version: the model the labelled
samples came from (docs/acft.md). The next job's base is the version this one publishes.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quark.acft.config import ACFTConfig
from quark.acft.corpus import accepted_examples, mix_corpus
from quark.acft.head import AuxHead, load_head, save_head
from quark.acft.training import (
    ACFTTrainer,
    AuxTrainer,
    Example,
    LabelledSample,
    label_records,
    new_head,
    sample_labelled,
)
from quark.checkpoint import STATE_FILE
from quark.models import QuarkModel, frozen_copy, load_model
from quark.online.job import (
    RESUME_FILE,
    HeadStore,
    JobCancelled,
    NoActiveVersion,
    UnlearnJob,
    Window,
    drop_checkpoint,
    skipped_result,
    split_window,
)
from quark.pool import PoolRecord
from quark.sampling import SamplingParams
from quark.version_eval import EvalResult

log = logging.getLogger(__name__)

AUX_DIR = "aux"  # checkpoint of the auxiliary head (final once the LLM phase started)
LLM_DIR = "llm"  # checkpoint of the LLM phase (model, frozen head, optimizer, state)
PUBLISHED_HEAD = "aux_head"  # the subdirectory of the published version


@dataclass
class Plan:
    """What one ACFT job trains on; saved with a checkpoint so a resumed job keeps it."""

    window: Window
    samples: list[LabelledSample]  # the auxiliary model's labelled samples
    corpus: list[Example]  # the LLM's fine-tuning corpus
    phase: str = "aux"  # "aux", then "llm"
    # Parallel scheme: the version whose published head (and weights, for q) this job uses.
    head_version: str | None = None

    def to_json(self, parent: str, baseline: EvalResult) -> dict[str, Any]:
        return {
            "parent": parent,
            "window": self.window.info,
            "eval_prompts": self.window.eval_prompts,
            "baseline": baseline.as_dict(),
            "samples": [[s.prompt, s.completion, s.satisfied] for s in self.samples],
            "corpus": [[e.prompt, e.completion] for e in self.corpus],
            "phase": self.phase,
            "head_version": self.head_version,
        }

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Plan:
        window = Window([], list(state["eval_prompts"]), dict(state["window"]))
        samples = [LabelledSample(p, c, bool(s)) for p, c, s in state["samples"]]
        corpus = [Example(p, c) for p, c in state["corpus"]]
        head_version = state.get("head_version")
        return cls(window, samples, corpus, str(state["phase"]), head_version)


def unprompted_records(records: list[PoolRecord], version: str) -> list[PoolRecord]:
    """Pool records that ``version`` served without a reward token: samples of its default
    output, the distribution the auxiliary model must be trained on (top-token samples are
    another distribution and are left out)."""
    return [
        r
        for r in records
        if r.metadata.get("model_version") == version and r.metadata.get("reward_token") is None
    ]


@dataclass
class ACFTJob(UnlearnJob):
    """One ACFT job; the window, evaluation, gate and publishing are ``UnlearnJob``'s."""

    head_info: dict[str, Any] = field(default_factory=dict)
    head_dir: Path | None = None

    @property
    def config(self) -> ACFTConfig:
        return self.params.acft_config()

    def run(self) -> dict[str, Any]:
        started = time.time()
        parent = self.deps.store.active()
        if parent is None:
            raise NoActiveVersion("no active model version: start the server or a worker first")
        state = _read_state(self.checkpoint_dir, parent)
        self.progress({"phase": "window", "parent": parent, "resumed": state is not None})
        if state is not None:
            plan, baseline = Plan.from_json(state), EvalResult(**state["baseline"])
            qm = self._load_policy(parent, plan)
        else:
            window = split_window(self._records(), self.params)
            if (reason := self._refusal(window)) is not None:
                return skipped_result(parent, window, reason)
            qm = self.deps.store.load(parent, device=self.deps.device)
            self.progress({"phase": "eval_active"})
            baseline = self._evaluate(qm, window.eval_prompts)
            self.progress({"phase": "sample", "eval_active": baseline.as_dict()})
            plan = self._plan(qm, parent, window)
            if not plan.samples and plan.head_version is None:
                reason = "no samples of the active version's default output"
                return skipped_result(parent, window, reason)
        outcome = self._train_and_judge(qm, parent, plan, baseline)
        drop_checkpoint(self.checkpoint_dir)
        outcome["seconds"] = time.time() - started
        return outcome

    def _refusal(self, window: Window) -> str | None:
        """Why this window cannot make a job, or None."""
        needed = self.params.min_records
        if window.info["train_records"] < needed:
            return (
                f"only {window.info['train_records']} scored training records in the window "
                f"(need {needed})"
            )
        if not window.eval_prompts:
            return "no held-out prompts in the window"
        if not accepted_examples(window.train, self.params.acft_threshold):
            return f"no completion in the window has reward >= {self.params.acft_threshold}"
        if self.params.acft_parallel and self._heads().latest() is None:
            return "no auxiliary head published yet (the aux task trains one per version)"
        return None

    def _plan(self, qm: QuarkModel, parent: str, window: Window) -> Plan:
        """The corpus, and the auxiliary model's samples unless the head comes from the
        parallel scheme (then ``head_version`` says whose head)."""
        if self.params.acft_parallel:
            found = self._heads().latest()
            if found is None:  # pruned since _refusal looked
                return Plan(window, [], [])
            head_version = found[0]
            window.info.update(head_version=head_version)
            return Plan(window, [], self._corpus(window), phase="llm", head_version=head_version)
        samples = self.aux_samples(qm, parent, window)
        window.info.update(
            aux_samples=len(samples), aux_satisfied=sum(s.satisfied for s in samples)
        )
        return Plan(window, samples, self._corpus(window))

    def aux_samples(self, qm: QuarkModel, version: str, window: Window) -> list[LabelledSample]:
        """Labelled samples of ``version``'s default output (``qm``): its no-token pool
        records, plus fresh samples of ``explore_prompts`` training prompts."""
        cfg, rng = self.config, random.Random(self.params.seed)
        samples = label_records(unprompted_records(window.train, version), cfg.threshold)
        prompts = sorted({r.prompt for r in window.train})
        explore = rng.sample(prompts, min(self.params.explore_prompts, len(prompts)))
        explore = [p for p in explore for _ in range(self.params.samples_per_prompt)]
        if explore:
            sampling = SamplingParams(
                self.params.response_length, self.params.temperature, self.params.top_p
            )
            samples += sample_labelled(
                qm,
                explore,
                self.deps.reward_fn,
                cfg,
                sampling,
                seed=self.params.seed,
                batch_size=self.params.generation_batch_size,
            )
        return samples

    def _corpus(self, window: Window) -> list[Example]:
        rng = random.Random(self.params.seed + 1)
        accepted = accepted_examples(window.train, self.config.threshold)
        corpus = mix_corpus(
            accepted, self.deps.utility_text, self.params.acft_utility_fraction, rng
        )
        window.info.update(corpus=len(corpus), corpus_utility=len(corpus) - len(accepted))
        return corpus

    def _heads(self) -> HeadStore:
        if self.deps.heads is None:
            raise ValueError("acft_parallel needs a head store (UnlearnDeps.heads)")
        return self.deps.heads

    def _load_policy(self, parent: str, plan: Plan) -> QuarkModel:
        """A resumed job's policy: the LLM checkpoint if the LLM phase had started."""
        llm = self._ckpt(LLM_DIR)
        if plan.phase == "llm" and llm is not None and (llm / STATE_FILE).is_file():
            return load_model(llm, device=self.deps.device)
        return self.deps.store.load(parent, device=self.deps.device)

    def _train_and_judge(
        self, qm: QuarkModel, parent: str, plan: Plan, baseline: EvalResult
    ) -> dict[str, Any]:
        torch.manual_seed(self.params.seed)
        if plan.head_version is not None:  # parallel scheme: q from the head's own version
            head = self._published_head(qm, plan.head_version)
            base = frozen_copy(self.deps.store.load(plan.head_version, device=self.deps.device))
        else:
            base = frozen_copy(self.deps.store.load(parent, device=self.deps.device))
            head = self._train_aux(qm, base, parent, plan, baseline)
        steps = self._train_llm(qm, base, head, parent, plan, baseline)
        del base
        with tempfile.TemporaryDirectory(prefix="acft-head-") as tmp:
            meta: dict[str, object] = {"base_version": parent, "acft": self.config.to_dict()}
            self.head_dir = save_head(head, Path(tmp) / PUBLISHED_HEAD, meta)
            return self._judge(qm, steps, parent, plan.window, baseline)

    # -- the auxiliary model --------------------------------------------------------------
    def _first_head(self, qm: QuarkModel, parent: str) -> AuxHead:
        """The parent's head when it has a usable one (a warm start), else a zero head."""
        return self.warm_head(qm, parent, self.deps.store.aux_head(parent))

    def warm_head(self, qm: QuarkModel, source: str | None, stored: Path | None) -> AuxHead:
        """The head in ``stored`` (trained for version ``source``) if its shape fits, as a
        warm start; else a zero head (q = p)."""
        fresh = new_head(qm, self.config)
        if stored is not None:
            head = load_head(stored, qm.device)
            if (head.hidden_size, head.vocab_size, head.rank) == (
                fresh.hidden_size,
                fresh.vocab_size,
                fresh.rank,
            ):
                self.head_info["warm_start"] = source
                return head
        self.head_info["warm_start"] = None
        return fresh

    def _published_head(self, qm: QuarkModel, version: str) -> AuxHead:
        """The head the aux task published for ``version``: q = p_version * R, one or more
        versions behind the policy (the paper's parallel scheme)."""
        path = self._heads().get(version)
        if path is None:
            raise FileNotFoundError(f"the auxiliary head of {version} is gone (pruned?)")
        self.head_info.update(base_version=version, parallel=True)
        return load_head(path, qm.device)

    def _train_aux(
        self, qm: QuarkModel, base: torch.nn.Module, parent: str, plan: Plan, baseline: EvalResult
    ) -> AuxHead:
        aux_dir = self._ckpt(AUX_DIR)
        resumable = aux_dir is not None and (aux_dir / STATE_FILE).is_file()
        head = load_head(aux_dir, qm.device) if resumable and aux_dir else None
        trainer = AuxTrainer(qm, base, head or self._first_head(qm, parent), self.config)
        if resumable and aux_dir is not None:
            trainer.load_state(aux_dir)
        if plan.phase == "aux":
            loop = functools.partial(self.aux_loop, trainer, plan.samples)
            self._guarded(trainer, parent, plan, baseline, loop)
            plan.phase = "llm"
            self._save(trainer, AUX_DIR, parent, plan, baseline)
        self.head_info.update(steps=trainer.step, samples=len(plan.samples))
        return trainer.head

    def aux_loop(self, trainer: AuxTrainer, samples: list[LabelledSample]) -> None:
        steps = self.config.aux_steps
        while trainer.step < steps:
            self._check_interrupted()
            [stats] = trainer.fit(samples, steps=1)
            report = {f"aux_{k}": v for k, v in stats.as_dict().items()}
            self.head_info["final"] = report
            self.progress({"phase": "aux", "aux_step": trainer.step, "aux_steps": steps, **report})

    # -- the LLM ---------------------------------------------------------------------------
    def _train_llm(
        self,
        qm: QuarkModel,
        base: torch.nn.Module,
        head: AuxHead,
        parent: str,
        plan: Plan,
        baseline: EvalResult,
    ) -> int:
        trainer = ACFTTrainer(qm, base, head, self.config)
        llm = self._ckpt(LLM_DIR)
        if llm is not None and (llm / STATE_FILE).is_file():
            trainer.load_state(llm)
        self._guarded(trainer, parent, plan, baseline, lambda: self._llm_loop(trainer, plan))
        return trainer.step

    def _llm_loop(self, trainer: ACFTTrainer, plan: Plan) -> None:
        steps = self.config.steps
        while trainer.step < steps:
            self._check_interrupted()
            [stats] = trainer.fit(plan.corpus, steps=1)
            self.progress({"phase": "train", "step": trainer.step, "steps": steps,
                           **stats.as_dict()})  # fmt: skip

    # -- checkpoints -----------------------------------------------------------------------
    def _guarded(
        self,
        trainer: AuxTrainer | ACFTTrainer,
        parent: str,
        plan: Plan,
        baseline: EvalResult,
        loop: Callable[[], None],
    ) -> None:
        """Run a training loop: any error (a time limit included) leaves a resumable
        checkpoint; a cancellation leaves nothing."""
        try:
            loop()
        except JobCancelled:
            drop_checkpoint(self.checkpoint_dir)
            raise
        except Exception:
            if trainer.step > 0:
                name = AUX_DIR if isinstance(trainer, AuxTrainer) else LLM_DIR
                self._save(trainer, name, parent, plan, baseline)
            raise

    def _save(
        self,
        trainer: AuxTrainer | ACFTTrainer,
        name: str,
        parent: str,
        plan: Plan,
        baseline: EvalResult,
    ) -> None:
        if self.checkpoint_dir is None:
            return
        trainer.save_checkpoint(self.checkpoint_dir / name)
        tmp = self.checkpoint_dir / f".{RESUME_FILE}.tmp"
        tmp.write_text(json.dumps(plan.to_json(parent, baseline)))
        tmp.replace(self.checkpoint_dir / RESUME_FILE)
        log.info("checkpointed ACFT job (%s, step %d) in %s", name, trainer.step, tmp.parent)

    def _ckpt(self, name: str) -> Path | None:
        return self.checkpoint_dir / name if self.checkpoint_dir is not None else None

    # -- publishing ------------------------------------------------------------------------
    def _extra_metadata(self, parent: str) -> dict[str, Any]:
        return {"aux_head": {"dir": PUBLISHED_HEAD, "base_version": parent, **self.head_info}}

    def _extra_dirs(self) -> dict[str, Path]:
        return {PUBLISHED_HEAD: self.head_dir} if self.head_dir is not None else {}


def _read_state(directory: Path | None, parent: str) -> dict[str, Any] | None:
    """A checkpoint's plan if it continues from ``parent``; stale ones are dropped."""
    if directory is None or not (directory / RESUME_FILE).is_file():
        return None
    state = dict(json.loads((directory / RESUME_FILE).read_text()))
    if state.get("parent") != parent or "samples" not in state:
        log.info("dropping checkpoint of %s: the active version is now %s", state["parent"], parent)
        drop_checkpoint(directory)
        return None
    return state
