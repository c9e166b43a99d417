"""The ``quark`` command line: train, eval, generate (and ``up`` for the service)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from quark.config import TASKS, QuarkConfig

log = logging.getLogger("quark")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per QuarkConfig field, with the field's help text and default."""
    defaults = QuarkConfig()
    for f in fields(QuarkConfig):
        if f.name in ("task", "total_steps"):
            continue
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else int
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=kind,
            default=None,
            help=f"{f.metadata['help']} (default: {default})",
        )


def _config_from_args(args: argparse.Namespace) -> QuarkConfig:
    values: dict[str, Any] = {"task": args.task, "total_steps": args.steps}
    for f in fields(QuarkConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in values:
            values[f.name] = value
    return QuarkConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quark", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="unlearn a behaviour offline with the Quark loop")
    train.add_argument("--task", choices=TASKS, default="toxicity")
    train.add_argument("--prompts", required=True, type=Path, help="prompt file (jsonl or text)")
    train.add_argument("--steps", type=int, default=1000, help="training steps")
    train.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/TASK-TIME)"
    )
    train.add_argument("--model", default="default", help="'default', a HF dir, a .gguf file")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    train.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts")
    train.add_argument("--time-budget", type=float, default=None, help="stop after N minutes")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_config_arguments(train)

    ev = sub.add_parser("eval", help="evaluate a model with the paper's metrics")
    ev.add_argument("--model", required=True, help="checkpoint dir, HF dir, .gguf or 'default'")
    ev.add_argument("--prompts", required=True, type=Path)
    ev.add_argument("--task", choices=TASKS, default="toxicity")
    ev.add_argument("--reward", default="top", help="top, bottom, none or a quantile index (0=top)")
    ev.add_argument("--samples", type=int, default=25, help="samples per prompt")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts")
    ev.add_argument(
        "--split",
        choices=("all", "toxic", "nontoxic"),
        default="all",
        help="RTP prompts with toxicity >= 0.5 (toxic) or below (nontoxic)",
    )
    ev.add_argument("--reference", default=None, help="original model for perplexity")
    ev.add_argument("--top-p", type=float, default=0.9)
    ev.add_argument("--max-new-tokens", type=int, default=20)
    ev.add_argument("--batch-size", type=int, default=50)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", type=Path, default=None, help="write the results here")

    gen = sub.add_parser("generate", help="print completions")
    gen.add_argument("--model", default="default")
    gen.add_argument("--reward", default="top")
    gen.add_argument("-n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto")
    gen.add_argument("prompt", nargs="+")

    _add_service_commands(sub)
    return parser


def _add_service_commands(sub: Any) -> None:
    """Service commands live in their own module; absent when it is not built yet."""
    try:
        from quark.service_cli import add_commands
    except ImportError:
        return
    add_commands(sub)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from quark.data import load_prompts
    from quark.models import add_reward_tokens, freeze, frozen_copy, load_model
    from quark.rewards import TASK_DEFAULT_REWARD, build_reward
    from quark.training import STATE_FILE, QuarkTrainer

    config = _config_from_args(args)
    out = args.out or Path("runs") / f"{config.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    model_dir = out / "model"
    prompts = [p.text for p in load_prompts(args.prompts, args.max_prompts)]
    reward_fn = build_reward(config.reward or TASK_DEFAULT_REWARD[config.task])
    torch.manual_seed(config.seed)
    resume = (model_dir / STATE_FILE).exists()
    original = load_model(args.model, device=args.device)
    if resume:
        qm, reference = load_model(model_dir, device=args.device), freeze(original.model)
    else:
        qm, reference = original, frozen_copy(original)
        qm.metadata = {"base_model": args.model, "task": config.task, "reward": config.reward}
        add_reward_tokens(qm, config.num_quantiles, torch.Generator().manual_seed(config.seed))
    trainer = QuarkTrainer(
        qm, reference, reward_fn, prompts, config, metrics_path=out / "metrics.jsonl"
    )
    if resume:
        trainer.load_state(model_dir)
        log.info("resumed %s at step %d", model_dir, trainer.step)
    deadline = time.monotonic() + 60 * args.time_budget if args.time_budget else float("inf")
    trainer.run(
        config.total_steps - trainer.step,
        checkpoint_dir=model_dir,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        should_stop=lambda: time.monotonic() > deadline,
    )
    print(f"trained {trainer.step} steps; model in {model_dir}; metrics in {out / 'metrics.jsonl'}")
    return 0


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
    qm = load_model(args.model, device=args.device)
    quantile = qm.reward_tokens.resolve(args.reward) if qm.reward_tokens else _no_token(args.reward)
    reference_source = args.reference or qm.metadata.get("base_model", "default")
    reference = (
        qm if reference_source == args.model else load_model(reference_source, device=args.device)
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
        seed=args.seed,
    )
    result.update(
        model=str(args.model),
        reward=args.reward,
        split=args.split,
        seconds=time.perf_counter() - started,
    )
    _print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _no_token(reward: str) -> None:
    if reward.lower() not in ("none", "top"):
        raise SystemExit(f"this model has no reward tokens: use --reward none (got {reward!r})")
    return None


def _print_table(result: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in result.items() if k != "examples"]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def cmd_generate(args: argparse.Namespace) -> int:
    from quark.models import load_model
    from quark.sampling import SamplingParams, generate

    qm = load_model(args.model, device=args.device)
    quantile = qm.reward_tokens.resolve(args.reward) if qm.reward_tokens else _no_token(args.reward)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
    prompt = " ".join(args.prompt)
    for completion in generate(qm, [prompt] * args.n, quantile, params, seed=args.seed):
        print(prompt + completion.text)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = COMMANDS.get(args.command) or args.handler
    try:
        return int(handler(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"quark {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
