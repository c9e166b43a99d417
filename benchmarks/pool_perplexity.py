"""How sharp is the text a Quark run trains on? Perplexity of its pooled samples under the
original model.

For each trained model directory (``quark train --out``; its ``pool.jsonl``), samples
``--count`` pool records (seed 0) from each of three groups and reports their completions'
perplexity given their prompts under the original (default) model:

* ``first_round``: the first exploration round (the original model, no token);
* ``last_two_rounds``: the last two exploration rounds (the trained model, top token);
* ``best_quantile``: the best fifth of the final pool by reward (what best-only training fits).

A run whose last rounds fall far below the first has sharpened its top-token distribution
(docs/results.md, ablation 11).

    python benchmarks/pool_perplexity.py runs/a/default/model runs/a/other/model --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch

from quark.evaluation import perplexity
from quark.models import load_model
from quark.pool import PoolRecord
from quark.training import POOL_FILE, read_pool


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", type=Path, nargs="+", help="model directories with pool.jsonl")
    p.add_argument("--count", type=int, default=200, help="records sampled per group")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the table here as JSON")
    return p.parse_args()


def groups(records: list[PoolRecord]) -> dict[str, list[PoolRecord]]:
    rounds = sorted({r.metadata["step"] for r in records})
    by_reward = sorted(records, key=lambda r: -(r.reward or 0.0))
    return {
        "first_round": [r for r in records if r.metadata["step"] == rounds[0]],
        "last_two_rounds": [r for r in records if r.metadata["step"] in rounds[-2:]],
        "best_quantile": by_reward[: len(records) // 5],
    }


def main() -> None:
    args = parse_args()
    pools = {model_dir: read_pool(model_dir) for model_dir in args.models}
    for model_dir, records in pools.items():
        if not records:
            raise SystemExit(f"{model_dir}: no {POOL_FILE}; give `quark train --out` model dirs")
    torch.set_num_threads(args.threads)
    reference = load_model()
    rng = random.Random(0)
    table: dict[str, dict[str, Any]] = {}
    for model_dir, records in pools.items():
        row: dict[str, Any] = {"pool": len(records)}
        for name, group in groups(records).items():
            chosen = rng.sample(group, min(args.count, len(group)))
            prompts, completions = [r.prompt for r in chosen], [r.completion for r in chosen]
            row[name] = perplexity(
                reference, prompts, completions, max_prompt_tokens=args.max_prompt_tokens
            )
        table[str(model_dir)] = row
        print(model_dir, {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()})
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
