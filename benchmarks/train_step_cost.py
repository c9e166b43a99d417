"""Seconds per Quark training step under the options that trade compute: frozen lower blocks,
bf16 autocast, the utility KL term, the reference-logit cache. Ratios against float32 without
the cache, measured side by side.

Every variant gets its own copy of SmolLM2-135M (the default model) with its own optimizer
and trains on the same fixed batch of RTP prompts with 20-token completions (best quantile,
as the defaults train). The variants run round-robin, one step each per round, so a noisy
machine slows them alike; medians over ``--rounds`` rounds after one warm-up round.

    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py --json out.json
    # a CPU without native bf16 (emulated bf16 is slow): float32 with and without the cache
    OMP_NUM_THREADS=1 python benchmarks/train_step_cost.py --variant "float32, reference cached"
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
NO_CACHE = {"reference_cache_mb": 0}  # a reference forward every step, as before the cache
VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {"train_precision": "float32", **NO_CACHE},
    "freeze 15 of 30 blocks": {"train_precision": "float32", "freeze_layers": 15, **NO_CACHE},
    "bf16 autocast": {"train_precision": "bfloat16", **NO_CACHE},
    "freeze 15 + bf16": {"train_precision": "bfloat16", "freeze_layers": 15, **NO_CACHE},
    "LoRA r16 + bf16": {"train_precision": "bfloat16", "lora_rank": 16, **NO_CACHE},
    "utility KL (2 x 64 tokens)": {
        "train_precision": "float32",
        "utility_kl_coef": 1.0,
        **NO_CACHE,
    },
    # The batch repeats every round, so after the warm-up every row comes from the cache:
    # the saving when a sample is trained on again.
    "float32, reference cached": {"train_precision": "float32"},
    "bf16, reference cached": {"train_precision": "bfloat16"},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=Path, default=DATA / "rtp" / "train.jsonl")
    p.add_argument("--utility-text", type=Path, default=DATA / "wikitext" / "wiki.raw.txt")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--variant",
        action="append",
        choices=list(VARIANTS),
        default=None,
        help="run only these (repeatable; float32 always runs, as the baseline)",
    )
    return p.parse_args()


def main() -> int:
    import torch

    from quark.config import QuarkConfig
    from quark.data import load_prompts, read_passages
    from quark.models import add_reward_tokens, frozen_copy, load_model
    from quark.pool import QuantizedSample
    from quark.training import QuarkTrainer

    args = parse_args()
    texts = [p.text for p in load_prompts(args.prompts, 16)]
    # 8 (prompt -> completion) rows: each prompt continued by the next prompt's words.
    batch = [QuantizedSample(texts[i], " " + texts[i + 8], 0.9, 0) for i in range(8)]
    passages = read_passages(args.utility_text)
    original = load_model("default", device="cpu")
    reference = frozen_copy(original)
    trainers: dict[str, QuarkTrainer] = {}
    chosen = {"float32", *(args.variant or VARIANTS)}
    for name, overrides in ((n, v) for n, v in VARIANTS.items() if n in chosen):
        qm = copy.deepcopy(original)
        add_reward_tokens(qm, 5, torch.Generator().manual_seed(0))
        config = QuarkConfig.from_dict(overrides)
        trainers[name] = QuarkTrainer(qm, reference, lambda p, c: [0.0] * len(p), [], config,
                                      utility=passages)  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for round_ in range(args.rounds + 1):
        for name, trainer in trainers.items():
            started = time.perf_counter()
            trainer.train_step(batch)
            if round_:  # round 0 warms up
                seconds[name].append(time.perf_counter() - started)
    base = statistics.median(seconds["float32"])
    rows = []
    print("| variant | s/step (median) | samples/s | time vs float32 |")
    print("|---|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        rows.append({"variant": name, "config": VARIANTS[name], "seconds": values,
                     "median": median, "ratio": median / base})  # fmt: skip
        print(f"| {name} | {median:.2f} | {len(batch) / median:.2f} | {median / base:.2f}x |")
    if args.json:
        args.json.write_text(
            json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
