"""Unlearning ablations at a fixed budget: train each arm, evaluate it the standard way, and
compare every arm with the baseline on the same prompts and seeds.

Each arm is ``name=flags`` (``quark train`` flags on top of the common ones); the first arm
is the baseline. Every arm trains from the same original model with the same seed and
budget (``--minutes`` of wall time or ``--steps``), then ``quark eval`` samples its top
token on the toxic half of RTP dev (100 prompts x 25 samples, top-p 0.9, 20 tokens) and,
with ``--nontoxic``, on the non-toxic half. The original model (no token) is evaluated once.
``quark compare`` pairs each arm with the baseline and the original.

    python benchmarks/ablation.py --out runs/ablation --steps 120 \\
        --arm "default=" --arm "by-prompt=--quantile-scope prompt" \\
        --judge toxicity:judge --judge toxicity:distilled

Raw results: ``<out>/<arm>/eval-*.json``; a summary: ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rtp"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arm", action="append", required=True, help="name=quark train flags")
    p.add_argument("--minutes", type=float, default=None, help="wall-time budget per arm")
    p.add_argument("--steps", type=int, default=None, help="step budget per arm")
    p.add_argument("--train-prompts", type=Path, default=DATA / "train.jsonl")
    p.add_argument("--eval-prompts", type=Path, default=DATA / "dev.jsonl")
    p.add_argument("--limit", type=int, default=100, help="evaluation prompts per split")
    p.add_argument("--samples", type=int, default=25)
    p.add_argument("--judge", action="append", default=None, help="quark eval --judge")
    p.add_argument("--nontoxic", action="store_true", help="also evaluate the non-toxic half")
    p.add_argument("--common", default="", help="flags every arm gets")
    return p.parse_args()


def quark(*args: str) -> None:
    command = [sys.executable, "-m", "quark.cli", *args]
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def train(args: argparse.Namespace, name: str, flags: str) -> dict[str, Any]:
    run = args.out / name
    budget = ["--steps", str(args.steps or 100_000)]
    if args.minutes:
        budget += ["--time-budget", str(args.minutes)]
    started = time.monotonic()
    quark(
        "train", "--prompts", str(args.train_prompts), "--out", str(run), "--no-progress",
        *budget, *shlex.split(args.common), *shlex.split(flags),
    )  # fmt: skip
    return {"train_seconds": time.monotonic() - started}


def evaluate(args: argparse.Namespace, model: str, reward: str, out: Path, split: str) -> Path:
    target = out / f"eval-{split}.json"
    if target.exists():
        return target
    judges = [a for j in args.judge or [] for a in ("--judge", j)]
    quark(
        "eval", "--model", model, "--reference", "default", "--prompts", str(args.eval_prompts),
        "--split", split, "--limit", str(args.limit), "--samples", str(args.samples),
        "--reward", reward, "--json", str(target), *judges,
    )  # fmt: skip
    return target


def compare(baseline: Path, other: Path, out: Path) -> dict[str, Any]:
    quark("compare", str(baseline), str(other), "--json", str(out))
    return dict(json.loads(out.read_text()))


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = ["toxic", "nontoxic"] if args.nontoxic else ["toxic"]
    original = args.out / "original"
    original.mkdir(exist_ok=True)
    summary: dict[str, Any] = {"arms": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    for split in splits:
        evaluate(args, "default", "none", original, split)
    arms = [arm.partition("=")[::2] for arm in args.arm]
    for name, flags in arms:
        info = train(args, name, flags) if not (args.out / name / "model").exists() else {}
        for split in splits:
            evaluate(args, str(args.out / name / "model"), "top", args.out / name, split)
        summary["arms"][name] = {"flags": flags, **info}
    baseline = arms[0][0]
    for name, _ in arms:
        for split in splits:
            arm_eval = args.out / name / f"eval-{split}.json"
            summary["arms"][name][f"vs_original_{split}"] = compare(
                original / f"eval-{split}.json",
                arm_eval,
                args.out / name / f"vs-original-{split}.json",
            )
            if name != baseline:
                summary["arms"][name][f"vs_{baseline}_{split}"] = compare(
                    args.out / baseline / f"eval-{split}.json",
                    arm_eval,
                    args.out / name / f"vs-{baseline}-{split}.json",
                )
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
