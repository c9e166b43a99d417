"""The Quark loop: explore -> score -> pool -> quantize -> learn, with checkpoints."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quark.batching import build_batch, build_utility_batch, completion_logits
from quark.checkpoint import load_loop_state, save_loop_state
from quark.config import QuarkConfig
from quark.lora import adapter_state, add_lora, freeze_lower_layers, load_adapter_state
from quark.loss import LossStats, quark_loss, reference_kl, restrict_vocab
from quark.models import QuarkModel, embedding_matrix, save_model
from quark.pool import (
    InMemoryPool,
    PoolRecord,
    QuantizedSample,
    quantile_stats,
    quantize_as_configured,
)
from quark.precision import bf16_autocast, training_autocast
from quark.reference_cache import ReferenceCache
from quark.rewards import RewardFn
from quark.sampling import SamplingParams, generate
from quark.schedule import TimeBudget, linear_warmup_decay

log = logging.getLogger(__name__)

POOL_FILE = "pool.jsonl"
ADAPTERS_FILE = "lora_adapters.safetensors"  # a LoRA run's adapters, for an exact resume


def _never() -> bool:
    return False


def _ignore(_: dict[str, Any]) -> None:
    return None


class QuarkTrainer:
    """Owns the policy, its frozen reference, the optimizer and the data pool.

    ``utility``: plain-text passages for the utility KL term (``config.utility_kl_coef``);
    the term is off while the coefficient is 0 or there are no passages.
    """

    def __init__(
        self,
        qm: QuarkModel,
        reference: torch.nn.Module,
        reward_fn: RewardFn,
        prompts: Sequence[str],
        config: QuarkConfig,
        pool: InMemoryPool | None = None,
        metrics_path: Path | None = None,
        utility: Sequence[str] = (),
    ) -> None:
        if qm.reward_tokens is None or len(qm.reward_tokens) != config.num_quantiles:
            raise ValueError("add config.num_quantiles reward tokens to the model first")
        self.qm, self.reference, self.reward_fn = qm, reference, reward_fn
        self.prompts, self.config = list(prompts), config
        self.utility = list(utility)
        self.pool = pool if pool is not None else InMemoryPool(config.pool_max_size)
        self.metrics_path = metrics_path
        self.step = 0
        self.rng = random.Random(config.seed)
        freeze_lower_layers(qm.model, config.freeze_layers)
        if config.lora_rank:
            add_lora(qm.model, config.lora_rank, config.lora_alpha, qm.reward_tokens.ids)
        self._bf16 = bf16_autocast(config.train_precision, qm.device)
        self.optimizer = torch.optim.AdamW(
            [p for p in qm.model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self._lr_budget: TimeBudget | None = None  # the run's, while its lr decays to it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            linear_warmup_decay(config.effective_warmup(), config.steps, self._lr_time_left),
        )
        self._epoch: list[QuantizedSample] = []
        self._round_epochs = 0  # passes over the trained quantiles since the last exploration
        self._listener: Callable[[dict[str, Any]], None] = _ignore
        self.reference_cache = ReferenceCache(config.reference_cache_mb * 2**20)

    # -- explore -----------------------------------------------------------------------
    def explore(self, quantile: int | None = 0) -> list[PoolRecord]:
        """Sample completions (conditioned on ``quantile``), score them, add them to the pool."""
        cfg = self.config
        self._listener({"event": "explore_start", "step": self.step, "quantile": quantile})
        prompts = [p for p in self._explore_prompts() for _ in range(cfg.samples_per_prompt)]
        self.qm.model.eval()
        params = SamplingParams(cfg.response_length, cfg.temperature, cfg.top_p)
        with self._autocast():  # bf16 sampling where training is bf16: 1.3x faster here
            completions = generate(
                self.qm,
                prompts,
                quantile,
                params,
                batch_size=cfg.generation_batch_size,
                max_prompt_tokens=cfg.max_prompt_tokens,
                seed=self.rng.randrange(2**31),
            )
        texts = [c.text for c in completions]
        rewards = self.reward_fn(prompts, texts)
        meta = {"step": self.step, "quantile": quantile, "source": "explore"}
        records = [
            PoolRecord(p, t, float(r), dict(meta))
            for p, t, r in zip(prompts, texts, rewards, strict=True)
        ]
        self.pool.add(records)
        self._epoch = []  # the pool changed: re-quantize before the next batch
        self._round_epochs = 0
        mean_reward = sum(rewards) / len(rewards)
        self._log(
            {
                "event": "explore",
                "step": self.step,
                "quantile": quantile,
                "samples": len(records),
                "mean_reward": mean_reward,
                "pool_size": len(self.pool),
            }
        )
        return records

    def _explore_prompts(self) -> list[str]:
        """This round's prompts: ``explore_focus`` of them drawn from pooled prompts weighted
        by how toxic (low-reward) their samples were, the rest uniformly."""
        cfg = self.config
        count = min(cfg.explore_prompts, len(self.prompts))
        focused = weighted_sample(
            self._prompt_toxicity(), round(cfg.explore_focus * count), self.rng
        )
        taken = set(focused)
        rest = [p for p in self.prompts if p not in taken]
        return focused + self.rng.sample(rest, min(len(rest), count - len(focused)))

    def _prompt_toxicity(self) -> dict[str, float]:
        """1 - mean reward of each candidate prompt's pooled samples."""
        candidates = set(self.prompts)
        rewards: dict[str, list[float]] = {}
        for record in self.pool.records():
            if record.reward is not None and record.prompt in candidates:
                rewards.setdefault(record.prompt, []).append(record.reward)
        return {p: 1.0 - sum(v) / len(v) for p, v in sorted(rewards.items())}

    # -- learn -------------------------------------------------------------------------
    def _next_batch(self) -> list[QuantizedSample]:
        size = self.config.batch_size
        if self._pass_used_up():
            samples = self._quantized()
            self._log(
                {
                    "event": "quantize",
                    "step": self.step,
                    "quantiles": quantile_stats(samples, self.config.num_quantiles),
                }
            )
            trained = [s for s in samples if s.quantile in self._trained_quantiles()]
            self._epoch = self.rng.sample(trained, len(trained))
            self._round_epochs += 1
        batch, self._epoch = self._epoch[:size], self._epoch[size:]
        return batch

    def _quantized(self) -> list[QuantizedSample]:
        return quantize_as_configured(self.pool.records(), self.config)

    def _trained_quantiles(self) -> set[int]:
        last = self.config.num_quantiles - 1
        chosen = {"all": set(range(last + 1)), "extremes": {0, last}, "best": {0}}
        return chosen[self.config.train_quantiles]

    def train_step(self, samples: Sequence[QuantizedSample] | None = None) -> LossStats:
        """One optimizer step of the Quark loss on a batch of quantized samples, plus
        ``utility_kl_coef`` x the utility KL when that term is on (``loss`` is then the sum)."""
        cfg = self.config
        samples = list(samples) if samples is not None else self._next_batch()
        self.qm.model.train()
        loss, stats = self._quark_loss(samples)
        utility_kl = self._utility_kl()
        if utility_kl is not None:
            loss = loss + cfg.utility_kl_coef * utility_kl
            stats = replace(stats, loss=float(loss.detach()), utility_kl=float(utility_kl.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.qm.model.parameters(), cfg.max_grad_norm)
        with scaled_token_update(self.qm, (cfg.token_lr or cfg.lr) / cfg.lr):
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.qm.model.eval()
        return stats

    def _quark_loss(self, samples: Sequence[QuantizedSample]) -> tuple[torch.Tensor, LossStats]:
        cfg = self.config
        batch = build_batch(self.qm, samples, cfg.max_prompt_tokens, cfg.response_length)
        width = batch.labels.shape[1]
        with self._autocast():
            policy = completion_logits(self.qm.model, batch.policy_ids, batch.policy_mask, width)

        def reference_rows(rows: list[int]) -> torch.Tensor:  # [len(rows), T, V]
            index = torch.tensor(rows, device=batch.ref_ids.device)
            with self._autocast(), torch.no_grad():
                ids, mask = batch.ref_ids[index], batch.ref_mask[index]
                return self._shared_vocab(completion_logits(self.reference, ids, mask, width))

        keys = [(s.prompt, s.completion) for s in samples]  # what the reference sees
        ref = self.reference_cache.logits(keys, batch.label_mask, reference_rows)
        return quark_loss(
            self._shared_vocab(policy),
            ref,
            batch.labels,
            batch.label_mask,
            cfg.kl_coef,
            cfg.entropy_coef,
        )

    def _utility_kl(self) -> torch.Tensor | None:
        """KL(pi_theta || pi_ref) over ``utility_rows`` passages drawn from ``self.utility``,
        the policy with the top reward token (what a client gets with reward=top), the
        reference without; None while the term is off. Quark's own KL only covers pooled
        completions: without this nothing holds the rest of the distribution."""
        cfg = self.config
        if cfg.utility_kl_coef <= 0 or cfg.utility_rows == 0 or not self.utility:
            return None
        passages = self.rng.sample(self.utility, min(cfg.utility_rows, len(self.utility)))
        batch = build_utility_batch(self.qm, passages, cfg.utility_tokens, self.qm.prefix_ids(0))
        width = batch.label_mask.shape[1]
        with self._autocast():
            policy = completion_logits(self.qm.model, batch.policy_ids, batch.policy_mask, width)
            with torch.no_grad():
                ref = completion_logits(self.reference, batch.ref_ids, batch.ref_mask, width)
        kl, _ = reference_kl(self._shared_vocab(policy), self._shared_vocab(ref), batch.label_mask)
        return kl

    def _autocast(self) -> AbstractContextManager[Any]:
        return training_autocast(self._bf16)

    def _shared_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 logits (the losses in float32 whatever the forward) over the vocabulary
        the policy and the reference share, reward tokens excluded."""
        reward_ids = self.qm.reward_tokens.ids if self.qm.reward_tokens else ()
        return restrict_vocab(logits.float(), self.qm.base_vocab_size, reward_ids)

    def run(
        self,
        steps: int,
        *,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 0,
        progress: bool = False,
        should_stop: Callable[[], bool] = _never,
        on_event: Callable[[dict[str, Any]], None] = _ignore,
        budget: TimeBudget | None = None,
    ) -> None:
        """The Quark loop, for ``quark train`` and every online job: ``steps`` more steps,
        exploring every ``sample_interval`` steps, or earlier once a round has made
        ``round_epochs`` passes (round 0 without a reward token when the pool is empty, then
        with the top token).

        ``should_stop`` is asked before every step: True ends the run early; it may also raise
        to abort (a cancelled job), leaving the trainer as it was after the last step.
        ``budget`` (``quark train --time-budget``) ends the run at its deadline, and with
        ``budget.decay_lr`` the learning rate reaches 0 there. ``on_event`` receives every
        explore and train record as it is logged.
        """
        self._listener = on_event
        self._lr_budget = budget if budget is not None and budget.decay_lr else None
        bar = tqdm(total=steps, disable=not progress, desc="quark", unit="step")
        end = self.step + steps
        try:
            while self.step < end and not should_stop() and not (budget and budget.expired()):
                if self._explore_due():
                    self.explore(quantile=None if len(self.pool) == 0 else 0)
                stats = self._timed_step()
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss:.3f}", kl=f"{stats.kl:.3f}")
                if checkpoint_dir and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint_dir)
        finally:
            bar.close()
            self._listener = _ignore
            self._lr_budget = None
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)

    def _lr_time_left(self) -> float:
        return self._lr_budget.left() if self._lr_budget is not None else 1.0

    def _explore_due(self) -> bool:
        if len(self.pool) == 0:
            if not self.config.explore_prompts or not self.prompts:
                raise ValueError(
                    "the pool is empty and nothing can be explored: give prompts and "
                    "explore_prompts >= 1 (--explore-prompts)"
                )
            return True
        cfg = self.config
        return bool(cfg.explore_prompts) and (
            self.step % cfg.sample_interval == 0 or self._round_passes_done()
        )

    def _round_passes_done(self) -> bool:
        """``round_epochs`` passes made this round and the last one used up (no full batch
        left): the next batch would repeat a sample the model has already seen this round."""
        cap = self.config.round_epochs
        return bool(cap) and self._round_epochs >= cap and self._pass_used_up()

    def _pass_used_up(self) -> bool:
        """No full batch left in this pass: the next batch re-quantizes and starts a new one."""
        return len(self._epoch) < self.config.batch_size

    def _timed_step(self) -> LossStats:
        started = time.perf_counter()
        stats = self.train_step()
        self._log(
            {
                "event": "train",
                "step": self.step,
                **stats.as_dict(),
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - started,
                "reference_cache_hit_rate": self.reference_cache.hit_rate,  # so far
            }
        )
        return stats

    # -- persistence -------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        self._listener(record)
        if self.metrics_path is None:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **record}, default=str) + "\n")

    def save_checkpoint(self, directory: Path) -> Path:
        """Model (safetensors) + tokenizer + quark.json; optimizer tensors; state; pool."""
        out = save_model(self.qm, directory, {"config": self.config.to_dict(), "step": self.step})
        save_loop_state(out, self.step, self.optimizer, self.scheduler, self.rng)
        if self.config.lora_rank:
            save_file(adapter_state(self.qm.model), str(out / ADAPTERS_FILE))
        with (out / POOL_FILE).open("w") as handle:
            for record in self.pool.records():
                handle.write(record.to_json() + "\n")
        return out

    def load_state(self, directory: Path) -> None:
        """Restore step, optimizer, scheduler, RNG and pool saved by ``save_checkpoint``."""
        self.step = load_loop_state(directory, self.optimizer, self.scheduler, self.rng)
        if self.config.lora_rank:
            load_adapter_state(self.qm.model, load_file(str(directory / ADAPTERS_FILE)))
        self.pool.add(read_pool(directory))
        self._epoch = []


def read_pool(directory: Path) -> list[PoolRecord]:
    """The pool ``QuarkTrainer.save_checkpoint`` wrote into ``directory`` (none: empty)."""
    path = directory / POOL_FILE
    if not path.exists():
        return []
    # "\n" alone: str.splitlines also breaks at U+2028 and U+0085, which to_json leaves raw
    lines = path.read_text(encoding="utf-8").split("\n")
    return [PoolRecord.from_json(line) for line in lines if line.strip()]


@contextmanager
def scaled_token_update(qm: QuarkModel, factor: float) -> Iterator[None]:
    """Multiply the optimizer's update of the reward-token embedding rows by ``factor``.

    Adam's step is invariant to the gradient's scale, so a separate learning rate for a few
    rows of one matrix means scaling their update: rows_after = before + factor * delta.
    """
    if factor == 1.0 or qm.reward_tokens is None:
        yield
        return
    ids = list(qm.reward_tokens.ids)
    weight = embedding_matrix(qm.model)
    before = weight[ids].detach().clone()  # [K, H]
    yield
    with torch.no_grad():
        weight[ids] = before + factor * (weight[ids] - before)


def weighted_sample(weights: dict[str, float], count: int, rng: random.Random) -> list[str]:
    """``count`` keys drawn without replacement, each with probability proportional to its
    weight (Efraimidis-Spirakis keys u^(1/w)); weights are floored at 1e-3."""
    if count <= 0 or not weights:
        return []
    keyed = [(rng.random() ** (1.0 / max(w, 1e-3)), k) for k, w in weights.items()]
    return [k for _, k in sorted(keyed, reverse=True)[:count]]
