"""The Quark loop: explore -> score -> pool -> quantize -> learn, with checkpoints."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quark.batching import build_batch, completion_logits
from quark.config import QuarkConfig
from quark.loss import LossStats, quark_loss, restrict_vocab
from quark.models import QuarkModel, save_model
from quark.pool import InMemoryPool, PoolRecord, QuantizedSample, quantile_stats, quantize
from quark.rewards import RewardFn
from quark.sampling import SamplingParams, generate

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
POOL_FILE = "pool.jsonl"


def linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then linear decay to 0 at ``total`` (official code)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class QuarkTrainer:
    """Owns the policy, its frozen reference, the optimizer and the data pool."""

    def __init__(
        self,
        qm: QuarkModel,
        reference: torch.nn.Module,
        reward_fn: RewardFn,
        prompts: Sequence[str],
        config: QuarkConfig,
        pool: InMemoryPool | None = None,
        metrics_path: Path | None = None,
    ) -> None:
        if qm.reward_tokens is None or len(qm.reward_tokens) != config.num_quantiles:
            raise ValueError("add config.num_quantiles reward tokens to the model first")
        self.qm, self.reference, self.reward_fn = qm, reference, reward_fn
        self.prompts, self.config = list(prompts), config
        self.pool = pool if pool is not None else InMemoryPool(config.pool_max_size)
        self.metrics_path = metrics_path
        self.step = 0
        self.rng = random.Random(config.seed)
        self.optimizer = torch.optim.AdamW(
            [p for p in qm.model.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(config.warmup_steps, config.total_steps)
        )
        self._epoch: list[QuantizedSample] = []

    # -- explore -----------------------------------------------------------------------
    def explore(self, quantile: int | None = 0) -> list[PoolRecord]:
        """Sample completions (conditioned on ``quantile``), score them, add them to the pool."""
        cfg = self.config
        chosen = self.rng.sample(self.prompts, min(cfg.explore_prompts, len(self.prompts)))
        prompts = [p for p in chosen for _ in range(cfg.samples_per_prompt)]
        self.qm.model.eval()
        params = SamplingParams(cfg.response_length, cfg.temperature, cfg.top_p)
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

    # -- learn -------------------------------------------------------------------------
    def _next_batch(self) -> list[QuantizedSample]:
        size = self.config.batch_size
        if len(self._epoch) < size:
            samples = quantize(self.pool.records(), self.config.num_quantiles)
            self._log(
                {
                    "event": "quantize",
                    "step": self.step,
                    "quantiles": quantile_stats(samples, self.config.num_quantiles),
                }
            )
            self._epoch = self.rng.sample(samples, len(samples))
        batch, self._epoch = self._epoch[:size], self._epoch[size:]
        return batch

    def train_step(self, samples: Sequence[QuantizedSample] | None = None) -> LossStats:
        """One optimizer step of the Quark loss on a batch of quantized samples."""
        cfg = self.config
        samples = list(samples) if samples is not None else self._next_batch()
        batch = build_batch(self.qm, samples, cfg.max_prompt_tokens, cfg.response_length)
        width = batch.labels.shape[1]
        self.qm.model.train()
        policy = completion_logits(self.qm.model, batch.policy_ids, batch.policy_mask, width)
        with torch.no_grad():
            ref = completion_logits(self.reference, batch.ref_ids, batch.ref_mask, width)
        reward_ids = self.qm.reward_tokens.ids if self.qm.reward_tokens else ()
        vocab = self.qm.base_vocab_size
        loss, stats = quark_loss(
            restrict_vocab(policy, vocab, reward_ids),
            restrict_vocab(ref, vocab, reward_ids),
            batch.labels,
            batch.label_mask,
            cfg.kl_coef,
            cfg.entropy_coef,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.qm.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.qm.model.eval()
        return stats

    def run(
        self,
        steps: int,
        checkpoint_dir: Path | None = None,
        checkpoint_every: int = 0,
        progress: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Train ``steps`` more steps, exploring with the top token every sample interval."""
        cfg = self.config
        if len(self.pool) == 0:
            self.explore(quantile=None)  # round one: the original behaviour, no token
        bar = tqdm(total=steps, disable=not progress, desc="quark", unit="step")
        end = self.step + steps
        while self.step < end and not should_stop():
            if self.step > 0 and self.step % cfg.sample_interval == 0:
                self.explore(quantile=0)
            started = time.perf_counter()
            stats = self.train_step()
            record = {
                "event": "train",
                "step": self.step,
                **stats.as_dict(),
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - started,
            }
            self._log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", kl=f"{stats.kl:.3f}")
            if checkpoint_dir and checkpoint_every and self.step % checkpoint_every == 0:
                self.save_checkpoint(checkpoint_dir)
        bar.close()
        if checkpoint_dir:
            self.save_checkpoint(checkpoint_dir)

    # -- persistence -------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics_path is None:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), **record}, default=str) + "\n")

    def save_checkpoint(self, directory: Path) -> Path:
        """Model (safetensors) + tokenizer + quark.json; optimizer tensors; state; pool."""
        out = save_model(self.qm, directory, {"config": self.config.to_dict(), "step": self.step})
        tensors, meta = _flatten_optimizer(self.optimizer)
        save_file(tensors, str(out / OPTIMIZER_FILE))
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "optimizer": meta,
            "rng": self.rng.getstate(),
        }
        (out / STATE_FILE).write_text(json.dumps(state, default=list))
        with (out / POOL_FILE).open("w") as handle:
            for record in self.pool.records():
                handle.write(record.to_json() + "\n")
        return out

    def load_state(self, directory: Path) -> None:
        """Restore step, optimizer, scheduler, RNG and pool saved by ``save_checkpoint``."""
        state = json.loads((directory / STATE_FILE).read_text())
        self.step = int(state["step"])
        self.scheduler.load_state_dict(state["scheduler"])
        _restore_optimizer(
            self.optimizer, load_file(str(directory / OPTIMIZER_FILE)), state["optimizer"]
        )
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        pool_file = directory / POOL_FILE
        if pool_file.exists():
            lines = pool_file.read_text().splitlines()
            self.pool.add(PoolRecord.from_json(line) for line in lines if line.strip())
        self._epoch = []


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors (safetensors, no pickle) plus JSON-able scalars."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{name}"] = value.contiguous().cpu()
            else:
                scalars["state"].setdefault(str(index), {})[name] = float(value)
    return tensors, scalars


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in scalars["state"].items():
        for name, value in entry.items():
            state.setdefault(int(index), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
