"""``quark eval`` and ``quark compare``: evaluate a model's output the standard way, and pair
two evaluations (the reporting half of the command line; ``quark.cli`` parses the flags)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the models module imports torch: only commands that need it load it
    from quark.models import QuarkModel
    from quark.rewards import RewardFn

#: `quark eval`'s toxicity judges: the headline judge (MiniLM + a head distilled from
#: Perspective) is not the default training reward (n-grams); the reward and profanity-check
#: follow as extra columns.
DEFAULT_JUDGES = ("toxicity:judge", "toxicity:distilled", "toxicity:profanity")


def _load_eval_prompts(args: argparse.Namespace) -> list[str]:
    from quark.data import load_prompts, split_by_toxicity

    items = load_prompts(args.prompts)
    if args.split != "all":
        toxic, nontoxic = split_by_toxicity(items)
        items = toxic if args.split == "toxic" else nontoxic
        if not items:
            raise SystemExit(f"{args.prompts} has no {args.split} prompts (needs prompt.toxicity)")
    return [p.text for p in items[: args.limit]]


def cmd_eval(args: argparse.Namespace) -> int:
    from quark.evaluation import evaluate
    from quark.models import load_model

    prompts = _load_eval_prompts(args)
    if args.judge and args.task != "toxicity":
        raise ValueError("--judge applies to --task toxicity only")
    judges = _judges(args.judge or list(DEFAULT_JUDGES)) if args.task == "toxicity" else None
    qm = _load_evaluated(args)
    quantile = reward_quantile(qm, args.reward)
    reference_source = args.reference or qm.metadata.get("base_model", "default")
    as_loaded = args.dtype == "float32" and args.quantization == "none"
    reference = (
        qm
        if reference_source == args.model and as_loaded
        else load_model(reference_source, device=args.device)
    )
    started = time.perf_counter()
    result = evaluate(
        qm,
        reference,
        args.task,
        prompts,
        quantile,
        samples=args.samples,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        judges=judges,
        seed=args.seed,
    )
    result.update(
        model=str(args.model),
        reference=str(reference_source),
        reward=args.reward,
        split=args.split,
        dtype=args.dtype,
        quantization=args.quantization,
        seconds=time.perf_counter() - started,
    )
    _print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _load_evaluated(args: argparse.Namespace) -> QuarkModel:
    """The evaluated model in ``--dtype``, with ``--quantization``'s weights as served."""
    from quark.models import load_model, resolve_device
    from quark.precision import resolve_dtype
    from quark.quantize import can_quantize, quantize_linears

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.quantization != "none" and not can_quantize(device, dtype):
        raise SystemExit(
            f"--quantization {args.quantization} serves a float32 or bfloat16 model on CPU, "
            f"not {dtype} on {device}: add --device cpu and --dtype auto (or float32, bfloat16)"
        )
    qm = load_model(args.model, device=args.device, dtype=dtype)
    if args.quantization != "none":
        quantize_linears(qm.model, args.quantization)
    return qm


def reward_quantile(qm: QuarkModel, reward: str) -> int | None:
    """The quantile ``--reward`` names; a model without reward tokens takes none or top."""
    if qm.reward_tokens is not None:
        return qm.reward_tokens.resolve(reward)
    if reward.lower() not in ("none", "top"):
        raise SystemExit(f"this model has no reward tokens: use --reward none (got {reward!r})")
    return None


def _judge_name(spec: str) -> str:
    """A short column name for a judge spec: profanity, perspective, hf:DIRNAME, ..."""
    kind, _, rest = spec.strip().partition(":")
    if kind.lower() != "toxicity":
        return spec.strip()
    backend, _, path = (rest or "profanity").partition(":")
    return f"hf:{Path(path).name}" if backend.lower() == "hf" and path else rest or "profanity"


def _judges(specs: Sequence[str]) -> dict[str, RewardFn]:
    """``--judge [NAME=]SPEC`` values -> {name: reward function}, in order."""
    from quark.rewards import build_reward

    judges: dict[str, RewardFn] = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or ":" in name or not name.strip():
            name, spec = _judge_name(item), item
        name = name.strip()
        if name in judges:
            raise ValueError(f"two judges named {name!r}: name them with --judge NAME=SPEC")
        judges[name] = build_reward(spec)
    return judges


def _interval_text(cell: dict[str, Any], fmt: str = ".4f") -> str:
    """``value [low, high]`` (n/a where undefined)."""

    def show(x: float | None) -> str:
        return "n/a" if x is None else f"{x:{fmt}}"

    return f"{show(cell['value'])} [{show(cell['low'])}, {show(cell['high'])}]"


def _print_table(result: dict[str, Any]) -> None:
    metrics: dict[str, Any] = result.get("metrics", {})
    judge = result.get("judge")
    rows = [
        (k, v)
        for k, v in result.items()
        if not isinstance(v, list | dict) and k not in metrics and f"{k}@{judge}" not in metrics
    ]
    width = max(len(k) for k in [*(k for k, _ in rows), *metrics])
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if metrics:
        intervals = result.get("intervals", {})
        print(
            f"{'':<{width}}  value [{intervals.get('level', 0.95):.0%} interval: "
            f"{intervals.get('method', 'bootstrap')}]"
        )
    for key, cell in metrics.items():
        print(f"{key:<{width}}  {_interval_text(cell)}")


def cmd_compare(args: argparse.Namespace) -> int:
    from quark.comparison import compare_runs

    def read(path: Path) -> dict[str, Any]:
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a quark eval JSON: {exc}") from exc
        if not isinstance(result, dict):
            raise ValueError(f"{path} is not a quark eval JSON")
        return result

    a, b = read(args.a), read(args.b)
    rows = compare_runs(a, b, resamples=args.resamples)
    if not rows:
        raise ValueError(f"{args.a} and {args.b} have no metric in common")
    print(f"A = {args.a}  ({a.get('model', '?')}, reward {a.get('reward', '?')})")
    print(f"B = {args.b}  ({b.get('model', '?')}, reward {b.get('reward', '?')})")
    print(
        f"paired over {a['prompts']} prompts x {a['samples']} samples (seed {a['seed']}, "
        f"top-p {a['top_p']}, {a['max_new_tokens']} new tokens); intervals: 95% paired "
        f"percentile bootstrap over prompts, {args.resamples} resamples; "
        "* = the B-A interval excludes 0"
    )
    table = [
        (
            row.metric,
            _interval_text(row.a.as_dict()),
            _interval_text(row.b.as_dict()),
            _interval_text(row.difference.as_dict(), "+.4f")
            + (" *" if row.difference.low > 0 or row.difference.high < 0 else ""),
            _interval_text(row.relative.as_dict(), "+.1%"),
        )
        for row in rows
    ]
    header = ("metric", "A", "B", "B-A", "(B-A)/A")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for line in [header, *table]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        fields_ = ("a", "b", "difference", "relative")
        out = {
            "a": str(args.a),
            "b": str(args.b),
            "resamples": args.resamples,
            "level": 0.95,
            "metrics": {
                row.metric: {f: getattr(row, f).as_dict() for f in fields_} for row in rows
            },
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0
