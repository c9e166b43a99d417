"""ACFT's two training steps: the auxiliary head (NADO) and the LLM (NLL + KL to q).

``AuxTrainer`` fits R on completions sampled from a frozen *base* model and labelled by the
oracle; ``ACFTTrainer`` then fine-tunes the policy on a corpus while pulling it, at every
corpus prefix, towards q = p_base * R renormalised. The base model must be the model the
labelled samples came from: R estimates success probabilities *under that model*, so only
p_base * R is the constrained distribution (docs/acft.md). Both trainers checkpoint their
state as safetensors + JSON, like ``quark.training.QuarkTrainer``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quark.acft.config import ACFTConfig
from quark.acft.features import Encode, FeatureCache
from quark.acft.head import AuxHead, load_head, save_head
from quark.acft.loss import ACFTStats, NadoStats, acft_loss, nado_loss, q_logprobs
from quark.batching import completion_logits, encode_pairs
from quark.checkpoint import load_loop_state, save_loop_state
from quark.loss import restrict_vocab
from quark.models import QuarkModel, embedding_matrix, save_model
from quark.pool import PoolRecord
from quark.precision import bf16_autocast, training_autocast
from quark.rewards import RewardFn
from quark.sampling import SamplingParams, generate
from quark.schedule import linear_warmup_decay

HEAD_DIR = "aux_head"


@dataclass(frozen=True)
class Example:
    """One corpus example: a prompt and the completion the LLM is trained to produce."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class LabelledSample(Example):
    """A completion sampled from the base model and its oracle label C(x)."""

    satisfied: bool


@dataclass
class ACFTBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, left-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, T] completion ids, right-aligned
    label_mask: torch.Tensor  # [B, T] 1.0 on real completion tokens


def label_records(records: Sequence[PoolRecord], threshold: float) -> list[LabelledSample]:
    """Scored pool records as oracle-labelled samples: C = reward >= threshold (unscored
    records are skipped)."""
    return [
        LabelledSample(r.prompt, r.completion, r.reward >= threshold)
        for r in records
        if r.reward is not None
    ]


def sample_labelled(
    qm: QuarkModel,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    config: ACFTConfig,
    params: SamplingParams,
    *,
    seed: int,
    batch_size: int = 32,
) -> list[LabelledSample]:
    """Sample one completion per prompt from ``qm`` (no reward token), score and label it.

    ``qm.model`` must be the base model the auxiliary head is trained for.
    """
    completions = generate(
        qm,
        prompts,
        None,
        params,
        batch_size=batch_size,
        max_prompt_tokens=config.max_prompt_tokens,
        seed=seed,
    )
    texts = [c.text for c in completions]
    rewards = reward_fn(prompts, texts)
    return [
        LabelledSample(p, t, r >= config.threshold)
        for p, t, r in zip(prompts, texts, rewards, strict=True)
    ]


def encode_examples(qm: QuarkModel, examples: Sequence[Example], config: ACFTConfig) -> ACFTBatch:
    """Tokenize (prompt -> completion) rows, left-padded, with right-aligned labels."""
    input_ids, attention_mask, labels, label_mask = encode_pairs(
        qm,
        [[] for _ in examples],
        [e.prompt for e in examples],
        [e.completion for e in examples],
        config.max_prompt_tokens,
        config.response_length,
    )
    return ACFTBatch(input_ids, attention_mask, labels, label_mask)


def pair_encoder(qm: QuarkModel, config: ACFTConfig) -> Encode:
    """(prompt, completion) pairs -> (input_ids, attention_mask, label_mask), as
    ``encode_examples``: what a ``FeatureCache`` runs the base model on."""

    def encode(pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, ...]:
        batch = encode_examples(qm, [Example(p, c) for p, c in pairs], config)
        return batch.input_ids, batch.attention_mask, batch.label_mask

    return encode


def new_head(qm: QuarkModel, config: ACFTConfig) -> AuxHead:
    """A zero-output head sized for ``qm``'s hidden size and original vocabulary."""
    hidden = embedding_matrix(qm.model).shape[1]
    return AuxHead(hidden, qm.base_vocab_size, config.aux_rank).to(qm.device)


class _Batches:
    """Shuffled epochs over a fixed list, drawn ``size`` at a time (last short batch kept)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._epoch: list[Any] = []

    def next(self, items: Sequence[Any], size: int) -> list[Any]:
        if not items:
            raise ValueError("nothing to train on: the sample list is empty")
        if not self._epoch:
            self._epoch = self.rng.sample(list(items), len(items))
        batch, self._epoch = self._epoch[:size], self._epoch[size:]
        return batch


class _Checkpointed:
    """Optimizer, scheduler, step and RNG state as safetensors + JSON (no pickle)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rng: random.Random
    step: int

    def _save_state(self, out: Path) -> None:
        save_loop_state(out, self.step, self.optimizer, self.scheduler, self.rng)

    def load_state(self, directory: Path) -> None:
        """Restore step, optimizer, scheduler and RNG saved by ``save_checkpoint``."""
        self.step = load_loop_state(directory, self.optimizer, self.scheduler, self.rng)


class AuxTrainer(_Checkpointed):
    """Trains the auxiliary head R on oracle-labelled samples of the frozen ``base`` model.

    Only the head's parameters are optimised; ``base`` runs under ``no_grad``. ``qm`` gives
    the tokenizer, device and vocabulary (its weights are not used).
    """

    def __init__(
        self, qm: QuarkModel, base: torch.nn.Module, head: AuxHead, config: ACFTConfig
    ) -> None:
        if head.vocab_size != qm.base_vocab_size:
            raise ValueError(f"head vocab {head.vocab_size} != model vocab {qm.base_vocab_size}")
        self.qm, self.base, self.head, self.config = qm, base, head, config
        self.step = 0
        self.rng = random.Random(config.seed)
        self._batches = _Batches(self.rng)
        head.requires_grad_(True)
        self.features = FeatureCache(base, pair_encoder(qm, config), config.aux_cache_samples)
        self.optimizer = torch.optim.AdamW(
            head.parameters(), lr=config.aux_lr, weight_decay=config.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            linear_warmup_decay(config.effective_warmup(config.aux_steps), config.aux_steps),
        )

    def forward(
        self, batch: ACFTBatch, samples: Sequence[Example]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_logits [B, T, V] with gradient to the head, base log-probs [B, T, V]) for
        ``samples``, encoded as ``batch``; the base model's features come from the cache."""
        pairs = [(s.prompt, s.completion) for s in samples]
        base = self.features.features(pairs, batch.labels.shape[1])
        base_logprobs = F.log_softmax(_restrict(self.qm, base.logits).float(), dim=-1)
        return self.head(base.hidden.float()), base_logprobs

    def train_step(self, samples: Sequence[LabelledSample]) -> NadoStats:
        """One optimizer step of NADO's loss on a batch of labelled samples."""
        batch = encode_examples(self.qm, samples, self.config)
        satisfied = torch.tensor([float(s.satisfied) for s in samples], device=self.qm.device)
        self.head.train()
        r_logits, base_logprobs = self.forward(batch, samples)
        loss, stats = nado_loss(
            r_logits,
            batch.labels,
            batch.label_mask,
            satisfied,
            base_logprobs,
            self.config.consistency_coef,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.head.eval()
        return stats

    def fit(self, samples: Sequence[LabelledSample], steps: int | None = None) -> list[NadoStats]:
        """``steps`` (default ``config.aux_steps``) steps over shuffled epochs of ``samples``."""
        count = self.config.aux_steps if steps is None else steps
        size = self.config.aux_batch_size
        return [self.train_step(self._batches.next(samples, size)) for _ in range(count)]

    def save_checkpoint(self, directory: Path) -> Path:
        """Head (safetensors + JSON), optimizer tensors and trainer state."""
        out = save_head(self.head, directory, {"acft": self.config.to_dict(), "step": self.step})
        self._save_state(out)
        return out


class ACFTTrainer(_Checkpointed):
    """Fine-tunes ``qm.model`` on a corpus with NLL + kl_coef * KL(q || p_theta).

    q = p_base * R renormalised, from the frozen ``base`` model and the frozen ``head``;
    both run under ``no_grad``, so only the policy's parameters move.
    """

    def __init__(
        self, qm: QuarkModel, base: torch.nn.Module, head: AuxHead, config: ACFTConfig
    ) -> None:
        if head.vocab_size != qm.base_vocab_size:
            raise ValueError(f"head vocab {head.vocab_size} != model vocab {qm.base_vocab_size}")
        self.qm, self.base, self.head, self.config = qm, base, head, config
        head.eval()
        head.requires_grad_(False)
        head.zero_grad(set_to_none=True)  # gradients left by an AuxTrainer are never used
        self.features = FeatureCache(base, pair_encoder(qm, config), config.aux_cache_samples)
        # The policy's forward and backward (the step's cost) as Quark's: weights, AdamW
        # and the loss stay float32. The frozen base's features stay float32: they are
        # computed once per sample and cached.
        self._bf16 = bf16_autocast(config.train_precision, qm.device)
        self.step = 0
        self.rng = random.Random(config.seed)
        self._batches = _Batches(self.rng)
        self.optimizer = torch.optim.AdamW(
            [p for p in qm.model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            linear_warmup_decay(config.effective_warmup(config.steps), config.steps),
        )

    @torch.no_grad()
    def target(
        self, batch: ACFTBatch, examples: Sequence[Example]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q [B, T, V], log p_base [B, T, V]) at the completion positions of
        ``examples``, encoded as ``batch``."""
        pairs = [(e.prompt, e.completion) for e in examples]
        base = self.features.features(pairs, batch.labels.shape[1])
        base_logprobs = F.log_softmax(_restrict(self.qm, base.logits).float(), dim=-1)
        r_logits = self.head(base.hidden.float())
        return q_logprobs(base_logprobs, r_logits), base_logprobs

    def train_step(self, examples: Sequence[Example]) -> ACFTStats:
        """One optimizer step of the ACFT loss on a batch of corpus examples."""
        batch = encode_examples(self.qm, examples, self.config)
        target, _ = self.target(batch, examples)
        self.qm.model.train()
        width = batch.labels.shape[1]
        with training_autocast(self._bf16):
            policy = completion_logits(self.qm.model, batch.input_ids, batch.attention_mask, width)
        loss, stats = acft_loss(
            _restrict(self.qm, policy).float(),
            target,
            batch.labels,
            batch.label_mask,
            self.config.kl_coef,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.qm.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.qm.model.eval()
        return stats

    def fit(self, corpus: Sequence[Example], steps: int | None = None) -> list[ACFTStats]:
        """``steps`` (default ``config.steps``) steps over shuffled epochs of ``corpus``."""
        count = self.config.steps if steps is None else steps
        return [
            self.train_step(self._batches.next(corpus, self.config.batch_size))
            for _ in range(count)
        ]

    def save_checkpoint(self, directory: Path) -> Path:
        """Model (safetensors) + tokenizer + quark.json, the frozen head, optimizer, state."""
        out = save_model(self.qm, directory, {"acft": self.config.to_dict(), "step": self.step})
        save_head(self.head, out / HEAD_DIR)
        self._save_state(out)
        return out

    @staticmethod
    def saved_head(directory: Path, device: torch.device | str = "cpu") -> AuxHead:
        """The auxiliary head stored with an ``ACFTTrainer`` checkpoint."""
        return load_head(directory / HEAD_DIR, device)


def _restrict(qm: QuarkModel, logits: torch.Tensor) -> torch.Tensor:
    """Logits over the original vocabulary (reward tokens, if any, are never targets)."""
    reward_ids = qm.reward_tokens.ids if qm.reward_tokens else ()
    return restrict_vocab(logits, qm.base_vocab_size, reward_ids)
