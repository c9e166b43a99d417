"""Unlearning ablations at a fixed budget: train each arm, evaluate it the standard way, and
compare every arm with the baseline on the same prompts and seeds.

Each arm is ``name=flags`` (``quark train`` flags on top of the common ones); the first arm
is the baseline. Every arm trains from the same original model with the same seed and
budget (``--minutes`` of wall time or ``--steps``), then ``quark eval`` samples its output on
the toxic half of RTP dev (100 prompts x 25 samples, top-p 0.9, 20 tokens) and, with
``--nontoxic``, on the non-toxic half. A Quark arm's output is its top token (with
``--no-token`` also its output without a token); an ACFT arm's (``--objective acft``) is its
default output, no token. The original model (no token) is evaluated once. ``quark compare``
pairs each output with the original, and each arm's first output with the baseline's.

With ``--wikitext`` the file's articles are split: the last ``--heldout-articles`` are held
out, the rest are the utility text (``--utility-text``) of ACFT arms and of Quark arms with
``--utility-kl-coef``, and every output also gets
its perplexity on the held-out passages (first 8 words as the prompt, the next 120 as the
text scored), the fluency measure the ACFT paper reports.

    python benchmarks/ablation.py --out runs/ablation --steps 120 \\
        --arm "default=" --arm "by-prompt=--quantile-scope prompt" \\
        --judge toxicity:judge --judge toxicity:distilled

    python benchmarks/ablation.py --out runs/acft --minutes 30 --nontoxic --no-token \\
        --wikitext ../shared/data/wikitext/wiki.raw.txt \\
        --arm "quark=" --arm "acft=--objective acft --max-prompts 1024"

Raw results: ``<out>/<arm>/eval-*.json``; a summary: ``<out>/summary.json``; the table is
printed (markdown).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quark.evaluation import perplexity_stat
from quark.intervals import relative_change

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "rtp"
HELDOUT_TEXT_WORDS = 120


@dataclass(frozen=True)
class Arm:
    name: str
    flags: str

    @property
    def acft(self) -> bool:
        words = shlex.split(self.flags)
        return any(pair == ("--objective", "acft") for pair in itertools.pairwise(words))

    @property
    def uses_utility_text(self) -> bool:
        """ACFT arms mix it into their corpus; Quark arms with the utility KL term need it."""
        return self.acft or any(w.startswith("--utility-kl-coef") for w in shlex.split(self.flags))

    def outputs(self, no_token: bool) -> list[str]:
        """Outputs evaluated, the first one primary (``eval-<split>.json``)."""
        if self.acft:
            return ["none"]
        return ["top", "none"] if no_token else ["top"]


def eval_file(arm_dir: Path, output: str, primary: str, split: str) -> Path:
    tag = "" if output == primary else f"{output}-"
    return arm_dir / f"eval-{tag}{split}.json"


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
    p.add_argument("--no-token", action="store_true", help="Quark arms: also the no-token output")
    p.add_argument("--wikitext", type=Path, default=None, help="WikiText raw file (see above)")
    p.add_argument("--heldout-articles", type=int, default=10)
    p.add_argument("--common", default="", help="flags every arm gets")
    return p.parse_args()


def quark(*args: str) -> None:
    command = [sys.executable, "-m", "quark.cli", *args]
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def train(args: argparse.Namespace, arm: Arm, utility: Path | None) -> dict[str, Any]:
    run = args.out / arm.name
    budget = ["--steps", str(args.steps or 100_000)]
    if args.minutes:
        budget += ["--time-budget", str(args.minutes)]
    extra = ["--utility-text", str(utility)] if arm.uses_utility_text and utility else []
    started = time.monotonic()
    quark(
        "train", "--prompts", str(args.train_prompts), "--out", str(run), "--no-progress",
        *budget, *shlex.split(args.common), *shlex.split(arm.flags), *extra,
    )  # fmt: skip
    return {"train_seconds": time.monotonic() - started}


def evaluate(args: argparse.Namespace, model: str, reward: str, target: Path, split: str) -> None:
    if target.exists():
        return
    judges = [a for j in args.judge or [] for a in ("--judge", j)]
    quark(
        "eval", "--model", model, "--reference", "default", "--prompts", str(args.eval_prompts),
        "--split", split, "--limit", str(args.limit), "--samples", str(args.samples),
        "--reward", reward, "--json", str(target), *judges,
    )  # fmt: skip


def compare(baseline: Path, other: Path, out: Path) -> dict[str, Any]:
    quark("compare", str(baseline), str(other), "--json", str(out))
    return dict(json.loads(out.read_text()))


def split_wikitext(path: Path, out: Path, heldout_articles: int) -> tuple[Path, Path]:
    """Passages (one per line) of the first articles, and of the last ``heldout_articles``."""
    articles: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("= ") and not text.startswith("= ="):
            articles.append([])  # a top-level " = Title = " heading
        elif text and not text.startswith("=") and articles:
            articles[-1].append(text)
    if len(articles) <= heldout_articles:
        raise SystemExit(
            f"{path} has {len(articles)} articles, too few to hold out {heldout_articles}"
        )
    train, heldout = out / "wikitext-train.txt", out / "wikitext-heldout.txt"
    train.write_text("\n".join(p for a in articles[:-heldout_articles] for p in a) + "\n")
    heldout.write_text("\n".join(p for a in articles[-heldout_articles:] for p in a) + "\n")
    return train, heldout


def heldout_perplexity(model: str, reward: str, heldout: Path, target: Path) -> dict[str, Any]:
    """The model's perplexity on the held-out passages, conditioned as its output is, with
    each passage's (mean NLL per token, tokens) for intervals over passages."""
    result: dict[str, Any] = json.loads(target.read_text()) if target.exists() else {}
    if "per_passage" not in result:  # files written before per-passage rows are recomputed
        from quark.acft.corpus import UTILITY_PROMPT_WORDS as PROMPT  # split as ACFT's corpus
        from quark.evaluation import completion_nll
        from quark.models import load_model

        passages = [line.split() for line in heldout.read_text(encoding="utf-8").splitlines()]
        passages = [w for w in passages if len(w) > PROMPT + 4]
        prompts = [" ".join(w[:PROMPT]) for w in passages]
        texts = [" " + " ".join(w[PROMPT : PROMPT + HELDOUT_TEXT_WORDS]) for w in passages]
        quantile = None if reward == "none" else 0
        nll = completion_nll(load_model(model), prompts, texts, batch_size=8, quantile=quantile)
        rows = [[total / max(count, 1), count] for total, count in nll]
        result = {"model": model, "reward": reward, "passages": len(passages),
                  "perplexity": perplexity_stat(np.array(rows)), "per_passage": rows}  # fmt: skip
        target.write_text(json.dumps(result))
    return result


def heldout_ratio(original: dict[str, Any], other: dict[str, Any]) -> str:
    """Held-out perplexity as a multiple of the original's, with a paired 95% interval."""
    change = relative_change(
        np.array(original["per_passage"]), np.array(other["per_passage"]), stat=perplexity_stat
    )
    return f"x{1 + change.estimate:.2f} [{1 + change.low:.2f}, {1 + change.high:.2f}]"


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    splits = ["toxic", "nontoxic"] if args.nontoxic else ["toxic"]
    utility = heldout = None
    if args.wikitext:
        utility, heldout = split_wikitext(args.wikitext, args.out, args.heldout_articles)
    original = args.out / "original"
    original.mkdir(exist_ok=True)
    summary: dict[str, Any] = {"arms": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    rows = [("original", "default", "none", {s: original / f"eval-{s}.json" for s in splits})]
    arms = [Arm(*arm.partition("=")[::2]) for arm in args.arm]
    for arm in arms:
        run = args.out / arm.name
        info = train(args, arm, utility) if not (run / "model").exists() else {}
        summary["arms"][arm.name] = {"flags": arm.flags, **info}
        primary = arm.outputs(args.no_token)[0]
        for output in arm.outputs(args.no_token):
            files = {s: eval_file(run, output, primary, s) for s in splits}
            rows.append((arm.name, str(run / "model"), output, files))
    for _, model, output, files in rows:
        for split, target in files.items():
            evaluate(args, model, output, target, split)
    for name, _, _, files in rows[1:]:
        for split, target in files.items():
            tag = target.stem.removeprefix("eval-")
            vs_original = target.with_name(f"vs-original-{tag}.json")
            summary["arms"][name][f"vs_original_{tag}"] = compare(
                original / f"eval-{split}.json", target, vs_original
            )
    baseline = arms[0].name
    for arm in arms[1:]:
        for split in splits:  # primary output against primary output
            ours = args.out / arm.name / f"eval-{split}.json"
            summary["arms"][arm.name][f"vs_{baseline}_{split}"] = compare(
                args.out / baseline / f"eval-{split}.json",
                ours,
                ours.with_name(f"vs-{baseline}-{split}.json"),
            )
    wiki: dict[tuple[str, str], str] = {}
    if heldout is not None:
        held = {
            (name, output): heldout_perplexity(
                model, output, heldout, args.out / name / f"heldout-ppl-{output}.json"
            )
            for name, model, output, _ in rows
        }
        reference = held[("original", "none")]
        for key, result in held.items():
            ratio = "" if key[0] == "original" else f" ({heldout_ratio(reference, result)})"
            wiki[key] = f"{result['perplexity']:.2f}{ratio}"
        summary["heldout_perplexity"] = {f"{n}/{o}": v for (n, o), v in wiki.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(rows, summary, wiki))
    print(f"summary: {args.out / 'summary.json'}")
    return 0


def table(rows: list[Row], summary: dict[str, Any], wiki: dict[tuple[str, str], str]) -> str:
    """Markdown: one row per (arm, output, split); changes paired against the original."""
    lines = [
        "| model | output | split | tox. prob. | EMT | ppl (completions) | ppl (held-out text) "
        "| dist-3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, output, files in rows:
        for split, target in files.items():
            tag = target.stem.removeprefix("eval-")
            paired = summary["arms"].get(name, {}).get(f"vs_original_{tag}", {}).get("metrics")
            cells = [_cell(json.loads(target.read_text()), paired, m) for m in METRICS]
            text_ppl = wiki.get((name, output), "-")
            lines.append(f"| {name} | {output} | {split} | {' | '.join(cells[:3])} | "
                         f"{text_ppl} | {cells[3]} |")  # fmt: skip
    return "\n".join(lines)


Row = tuple[str, str, str, dict[str, Path]]
METRICS = ("toxicity_probability", "expected_max_toxicity", "perplexity", "dist-3")


def _cell(result: dict[str, Any], paired: dict[str, Any] | None, metric: str) -> str:
    value = result[metric]
    if not paired:
        return f"{value:.3f}"
    key = metric if metric in paired else f"{metric}@{result['judge']}"
    rel = paired[key]["relative"]
    star = "*" if rel["low"] > 0 or rel["high"] < 0 else ""
    return f"{value:.3f} ({rel['value']:+.0%} [{rel['low']:+.0%}, {rel['high']:+.0%}]{star})"


if __name__ == "__main__":
    sys.exit(main())
