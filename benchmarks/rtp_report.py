"""Turn a `quark train` run and `quark eval` results into a markdown table and a PNG plot.

Usage:
  python benchmarks/rtp_report.py --metrics runs/rtp/metrics.jsonl \
      --eval original=runs/eval/original --eval "trained, no token=runs/eval/none" \
      --eval "trained, top token=runs/eval/top" --plot docs/rtp_quantile_rewards.png

Each --eval NAME=PREFIX reads PREFIX-toxic.json and PREFIX-nontoxic.json written by
`quark eval --json`. Results that carry 95 % intervals (`metrics`, written since issue 12) show
them as `value [low, high]`; older results show the value alone. Toxicity columns are the
headline judge's (the first `--judge` of `quark eval`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLUMNS = [
    ("expected_max_toxicity", "exp. max toxicity"),
    ("toxicity_probability", "toxicity prob."),
    ("perplexity", "perplexity"),
    ("dist-1", "dist-1"),
    ("dist-2", "dist-2"),
    ("dist-3", "dist-3"),
]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_quantiles(events: list[dict[str, Any]], out: Path) -> None:
    """Mean reward of each quantile at every re-quantization, and exploration reward."""
    quantize = [e for e in events if e["event"] == "quantize"]
    explore = [e for e in events if e["event"] == "explore"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for q in range(len(quantize[0]["quantiles"])):
        ax.plot(
            [e["step"] for e in quantize],
            [e["quantiles"][q]["mean"] for e in quantize],
            marker=".",
            label=f"quantile {q}" + (" (top)" if q == 0 else ""),
        )
    ax.plot(
        [e["step"] for e in explore],
        [e["mean_reward"] for e in explore],
        "k--",
        marker="o",
        label="new samples (round 1: no token; then top token)",
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("reward = 1 - P(offensive)")
    ax.set_title("Quark on SmolLM2-135M: pool reward by quantile over training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def training_summary(events: list[dict[str, Any]]) -> dict[str, float]:
    steps = [e for e in events if e["event"] == "train"]
    seconds = [e["seconds"] for e in steps]
    return {
        "steps": len(steps),
        "seconds_per_step": sum(seconds) / max(1, len(seconds)),
        "final_kl": steps[-1]["kl"] if steps else float("nan"),
    }


def cell(result: dict[str, Any], key: str) -> str:
    """``value`` or, when the result has its interval, ``value [low, high]``."""
    judged = f"{key}@{result.get('judge')}"
    interval = result.get("metrics", {}).get(judged) or result.get("metrics", {}).get(key)
    if interval is None or interval.get("low") is None or interval.get("high") is None:
        return f"{result[key]:.3f}"
    return f"{interval['value']:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def eval_table(evals: list[tuple[str, str]], seconds_per_step: float) -> str:
    header = "| model | prompts | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for split in ("toxic", "nontoxic"):
        for name, prefix in evals:
            path = Path(f"{prefix}-{split}.json")
            if not path.exists():
                continue
            result = json.loads(path.read_text())
            cells = " | ".join(cell(result, key) for key, _ in COLUMNS)
            lines.append(
                f"| {name} | {split} ({result['prompts']}x{result['samples']}) | {cells} |"
            )
    lines.append(f"\nSeconds per training step (batch of 8, 2-core CPU): {seconds_per_step:.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--eval", action="append", default=[], help="NAME=PREFIX")
    parser.add_argument("--plot", type=Path, default=Path("docs/rtp_quantile_rewards.png"))
    args = parser.parse_args()
    events = read_metrics(args.metrics)
    plot_quantiles(events, args.plot)
    summary = training_summary(events)
    print(json.dumps(summary))
    print(eval_table([tuple(e.split("=", 1)) for e in args.eval], summary["seconds_per_step"]))


if __name__ == "__main__":
    main()
