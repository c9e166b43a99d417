"""The ``quark`` command line: train, eval, generate (and ``up`` for the service)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from types import NoneType
from typing import TYPE_CHECKING, Any, get_args

from quark.acft.config import ObjectiveParams
from quark.config import TASKS, Params, QuarkConfig
from quark.eval_commands import DEFAULT_JUDGES, cmd_compare, cmd_eval, reward_quantile
from quark.precision import DTYPE_CHOICES, QUANTIZATION_CHOICES
from quark.schedule import TimeBudget
from quark.service.up import add_commands as add_service_commands

if TYPE_CHECKING:  # the models module imports torch: only commands that need it load it
    from quark.rewards import RewardFn

log = logging.getLogger("quark")


def _add_config_arguments(parser: argparse.ArgumentParser, cls: type[Params]) -> None:
    """One ``--flag`` per field of ``cls``, with the field's help text and default."""
    defaults, types = cls(), cls.field_types()
    for f in fields(cls):
        if f.name == "task":
            continue  # its own flag, with choices
        default = getattr(defaults, f.name)
        kind = next((t for t in get_args(types[f.name]) if t is not NoneType), types[f.name])
        options: dict[str, Any] = {"type": kind, "choices": f.metadata.get("choices")}
        if kind is bool:
            options = {"action": argparse.BooleanOptionalAction}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            # argparse %-formats help: a literal "%" in a field's help must reach it as "%%".
            help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"),
            **options,
        )


def _config_from_args(args: argparse.Namespace) -> QuarkConfig:
    values: dict[str, Any] = {"task": args.task}
    for f in fields(QuarkConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in values:
            values[f.name] = value
    return QuarkConfig(**values)


def _objective_from_args(args: argparse.Namespace) -> ObjectiveParams:
    """``--objective`` and the ``--acft-*`` flags given (the rest: their defaults)."""
    given = {f.name: getattr(args, f.name, None) for f in fields(ObjectiveParams)}
    return ObjectiveParams(**{k: v for k, v in given.items() if v is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quark", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="unlearn a behaviour offline with the Quark loop (or --objective acft)"
    )
    train.add_argument("--task", choices=TASKS, default="toxicity")
    train.add_argument("--prompts", required=True, type=Path, help="prompt file (jsonl or text)")
    train.add_argument(
        "--out", type=Path, default=None, help="run directory (default runs/TASK-TIME)"
    )
    train.add_argument("--model", default="default", help="'default', a HF dir, a .gguf file")
    train.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    train.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts")
    train.add_argument("--time-budget", type=float, default=None, help="stop after N minutes")
    train.add_argument(
        "--lr-decay-to-budget",
        action="store_true",
        help="with --time-budget (Quark): decay the learning rate linearly to 0 at the end of "
        "the budget, as --steps does at its last step; without it the rate stays at --lr",
    )
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--utility-text",
        type=Path,
        default=None,
        help="plain-text file, a passage per line (lines of 12+ words; e.g. WikiText): Quark "
        "adds a KL to the original model on its passages when --utility-kl-coef > 0; ACFT "
        "mixes them into its fine-tuning corpus",
    )
    _add_config_arguments(train, QuarkConfig)
    _add_config_arguments(train, ObjectiveParams)

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
    ev.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="float32",
        help="precision the evaluated model runs in (QUARK_DTYPE's choices; the reference "
        "model for perplexity stays float32)",
    )
    ev.add_argument(
        "--quantization",
        choices=QUANTIZATION_CHOICES,
        default="none",
        help="evaluate the model as the server serves it with QUARK_QUANTIZATION "
        "(int8 and int4: on CPU, with --dtype float32 or bfloat16)",
    )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--judge",
        action="append",
        default=None,
        metavar="[NAME=]SPEC",
        help="toxicity judge: a reward spec (toxicity = 1 - reward), e.g. toxicity:judge, "
        "toxicity:hf:/path; repeatable, the first is the headline (default: "
        + ", ".join(DEFAULT_JUDGES)
        + "; the headline is never the default training reward)",
    )
    ev.add_argument("--json", type=Path, default=None, help="write the results here")

    cmp = sub.add_parser(
        "compare",
        help="paired comparison of two `quark eval --json` runs on the same prompts",
        description="For every metric in both runs: A, B, B - A and (B - A) / A, each with a "
        "95% paired percentile-bootstrap interval over prompts. The runs must share prompts, "
        "seed, samples, top-p, max new tokens and max prompt tokens.",
    )
    cmp.add_argument("a", type=Path, metavar="A.json", help="the baseline run")
    cmp.add_argument("b", type=Path, metavar="B.json", help="the run compared with it")
    cmp.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    cmp.add_argument("--json", type=Path, default=None, help="also write the comparison here")

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

    add_service_commands(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from quark.checkpoint import STATE_FILE
    from quark.data import load_prompts
    from quark.models import add_reward_tokens, freeze, frozen_copy, load_model
    from quark.rewards import TASK_DEFAULT_REWARD, build_reward
    from quark.training import QuarkTrainer

    config = _config_from_args(args)
    objective = _objective_from_args(args)
    _check_time_budget(args, objective)
    out = args.out or Path("runs") / f"{config.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    model_dir = out / "model"
    prompts = [p.text for p in load_prompts(args.prompts, args.max_prompts)]
    reward_fn = build_reward(config.reward or TASK_DEFAULT_REWARD[config.task])
    torch.manual_seed(config.seed)
    if objective.objective == "acft":
        return _train_acft(args, config, objective, prompts, reward_fn, out)
    utility = _utility_passages(args.utility_text, config)
    resume = (model_dir / STATE_FILE).exists()
    original = load_model(args.model, device=args.device)
    if resume:
        qm, reference = load_model(model_dir, device=args.device), freeze(original.model)
    else:
        qm, reference = original, frozen_copy(original)
        qm.metadata = {"base_model": args.model, "task": config.task, "reward": config.reward}
        add_reward_tokens(
            qm,
            config.num_quantiles,
            torch.Generator().manual_seed(config.seed),
            init=config.token_init,
        )
    metrics = out / "metrics.jsonl"
    trainer = QuarkTrainer(
        qm, reference, reward_fn, prompts, config, metrics_path=metrics, utility=utility
    )
    if resume:
        trainer.load_state(model_dir)
        log.info("resumed %s at step %d", model_dir, trainer.step)
    budget = _time_budget(args)  # from here: loading the models is not training time
    trainer.run(
        config.steps - trainer.step,
        checkpoint_dir=model_dir,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        budget=budget,
    )
    print(f"trained {trainer.step} steps; model in {model_dir}; metrics in {out / 'metrics.jsonl'}")
    return 0


def _check_time_budget(args: argparse.Namespace, objective: ObjectiveParams) -> None:
    if args.time_budget is not None and args.time_budget <= 0:
        raise ValueError(
            f"--time-budget must be a positive number of minutes, got {args.time_budget}"
        )
    if args.lr_decay_to_budget and not args.time_budget:
        raise ValueError("--lr-decay-to-budget needs --time-budget MINUTES")
    if args.lr_decay_to_budget and objective.objective == "acft":
        raise ValueError(
            "--lr-decay-to-budget applies to --objective quark; ACFT decays over --steps"
        )


def _time_budget(args: argparse.Namespace) -> TimeBudget | None:
    """``--time-budget`` minutes from now (None without one)."""
    if args.time_budget is None:
        return None
    return TimeBudget(60 * args.time_budget, decay_lr=args.lr_decay_to_budget)


def _utility_passages(path: Path | None, config: QuarkConfig) -> list[str]:
    """The passages of ``--utility-text`` for Quark's utility KL term (none while it is off)."""
    from quark.data import utility_passages

    if config.utility_kl_coef == 0 and path is not None:
        log.warning("--utility-text is unused while --utility-kl-coef is 0")
    fix = (
        "give --utility-text FILE (plain text, a passage per line, e.g. WikiText) or set "
        "--utility-kl-coef 0"
    )
    return utility_passages(config.utility_kl_coef, path, fix)


def _train_acft(
    args: argparse.Namespace,
    config: QuarkConfig,
    objective: ObjectiveParams,
    prompts: list[str],
    reward_fn: RewardFn,
    out: Path,
) -> int:
    """``quark train --objective acft``: one ACFT round (quark.acft.offline); no resume."""
    from quark.acft.offline import run_offline

    budget = _time_budget(args)
    model = (args.model, args.device)
    run = run_offline(model, config, objective, prompts, reward_fn, out, args.utility_text,
                      should_stop=budget.expired if budget else lambda: False)  # fmt: skip
    print(f"trained {run} ACFT steps; model in {out / 'model'}; metrics in {out / 'metrics.jsonl'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from quark.models import load_model
    from quark.sampling import SamplingParams, generate

    qm = load_model(args.model, device=args.device)
    quantile = reward_quantile(qm, args.reward)
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p)
    prompt = " ".join(args.prompt)
    for completion in generate(qm, [prompt] * args.n, quantile, params, seed=args.seed):
        print(prompt + completion.text)
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "generate": cmd_generate,
}


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
