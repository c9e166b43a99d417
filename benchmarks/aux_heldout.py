"""Does ACFT's auxiliary head learn the constraint, or the samples it saw? Held-out NADO loss.

Samples completions of RTP train prompts from the default model (no token), scores them with
the reward (C = reward >= ``--threshold``), holds out ``--heldout`` of them, trains a fresh
head (``AuxTrainer``, the library's defaults unless flagged) on the rest, and every
``--eval-every`` steps reports on the held-out samples:

* BCE of R(x<=t) against C(x) at every completion position, next to the BCE of the best
  constant predictor (the held-out base rate): a head that beats it has learned something
  that generalises;
* accuracy of R(x<=t) > 1/2, and the AUC with which the mean R over a completion ranks
  satisfying above violating completions (1/2 = chance).

It also reports seconds per auxiliary step with the feature cache (every epoch after the
first skips the base model's forward) and the cost of the first epoch.

    python benchmarks/aux_heldout.py --samples-file runs/aux/samples.jsonl --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rtp"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=Path, default=DATA / "train.jsonl")
    p.add_argument("--count", type=int, default=1024, help="prompts sampled (one completion each)")
    p.add_argument("--samples-file", type=Path, required=True, help="created if missing")
    p.add_argument("--threshold", type=float, default=0.8, help="C = reward >= threshold")
    p.add_argument("--heldout", type=int, default=160)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--aux-lr", type=float, default=None)
    p.add_argument("--aux-rank", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args()


def scored_samples(args: argparse.Namespace, qm: Any) -> list[dict[str, Any]]:
    """(prompt, completion, reward) rows, sampled and scored once, then read from the file."""
    if not args.samples_file.exists():
        from quark.data import load_prompts
        from quark.rewards import TASK_DEFAULT_REWARD, build_reward
        from quark.sampling import SamplingParams, generate

        prompts = [p.text for p in load_prompts(args.prompts, args.count)]
        params = SamplingParams(20, 1.0, 1.0)
        completions = generate(qm, prompts, None, params, batch_size=32, max_prompt_tokens=256,
                               seed=42)  # fmt: skip
        texts = [c.text for c in completions]
        rewards = build_reward(TASK_DEFAULT_REWARD["toxicity"])(prompts, texts)
        args.samples_file.parent.mkdir(parents=True, exist_ok=True)
        with args.samples_file.open("w") as handle:
            for prompt, text, reward in zip(prompts, texts, rewards, strict=True):
                row = {"prompt": prompt, "completion": text, "reward": reward}
                handle.write(json.dumps(row) + "\n")
    return [json.loads(line) for line in args.samples_file.read_text().splitlines()]


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / max(1, len(pos) * len(neg))


@torch.no_grad()
def heldout_report(trainer: Any, samples: list[Any]) -> dict[str, float]:
    from quark.acft.training import encode_examples

    bce_sum = tokens = correct = 0.0
    means: list[float] = []
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        batch = encode_examples(trainer.qm, chunk, trainer.config)
        r_logits, _ = trainer.forward(batch, chunk)
        taken = r_logits.gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
        labels = torch.tensor([float(s.satisfied) for s in chunk]).unsqueeze(-1)
        mask = batch.label_mask
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            taken, labels.expand_as(taken), reduction="none"
        )
        bce_sum += float((bce * mask).sum())
        tokens += float(mask.sum())
        correct += float((((taken > 0) == labels.bool()).float() * mask).sum())
        r = torch.sigmoid(taken)
        means += ((r * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    rate = sum(s.satisfied for s in samples) / len(samples)
    constant = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    return {
        "bce": bce_sum / tokens,
        "bce_constant": constant,
        "accuracy": correct / tokens,
        "auc": auc(means, [s.satisfied for s in samples]),
    }


def main() -> int:
    from quark.acft.config import ACFTConfig
    from quark.acft.training import AuxTrainer, LabelledSample, new_head
    from quark.models import frozen_copy, load_model

    args = parse_args()
    qm = load_model("default", device="cpu")
    rows = scored_samples(args, qm)
    samples = [LabelledSample(r["prompt"], r["completion"], r["reward"] >= args.threshold)
               for r in rows if r["completion"].strip()]  # fmt: skip
    random.Random(0).shuffle(samples)
    heldout, train = samples[: args.heldout], samples[args.heldout :]
    overrides = {"threshold": args.threshold, "aux_steps": args.steps}
    overrides |= {"aux_lr": args.aux_lr} if args.aux_lr else {}
    overrides |= {"aux_rank": args.aux_rank} if args.aux_rank else {}
    config = ACFTConfig.from_dict(overrides)
    torch.manual_seed(0)
    trainer = AuxTrainer(qm, frozen_copy(qm), new_head(qm, config), config)
    epoch = math.ceil(len(train) / config.aux_batch_size)
    report: dict[str, Any] = {
        "config": config.to_dict(), "train": len(train), "heldout": len(heldout),
        "train_satisfied": sum(s.satisfied for s in train), "steps_per_epoch": epoch,
        "rows": [],
    }  # fmt: skip
    print("| step | epoch | train bce (recent) | held-out bce | constant bce | accuracy | AUC |")
    print("|---|---|---|---|---|---|---|")
    recent: list[float] = []
    timings: list[float] = []
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        [stats] = trainer.fit(train, steps=1)
        timings.append(time.perf_counter() - started)
        recent.append(stats.bce)
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "epoch": step / epoch, "train_bce": sum(recent) / len(recent)}
            row |= heldout_report(trainer, heldout)
            report["rows"].append(row)
            recent = []
            print(f"| {step} | {row['epoch']:.1f} | {row['train_bce']:.3f} | {row['bce']:.3f} | "
                  f"{row['bce_constant']:.3f} | {row['accuracy']:.3f} | {row['auc']:.3f} |",
                  flush=True)  # fmt: skip
    first, later = timings[:epoch], timings[epoch:]
    report["seconds_per_step_first_epoch"] = sorted(first)[len(first) // 2]
    report["seconds_per_step_cached"] = sorted(later)[len(later) // 2] if later else None
    print(f"s/step: first epoch {report['seconds_per_step_first_epoch']:.2f}, "
          f"cached {report['seconds_per_step_cached']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
