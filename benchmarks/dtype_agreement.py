"""Serving in bfloat16, int8 or int4 instead of float32: how much do outputs change, how much
faster?

On the real default model (SmolLM2-135M-Instruct, converted from its GGUF), loaded in
float32 and in each ``--variants`` from the same weights (default: bfloat16, and bfloat16
with int8 or int4 weights, ``QUARK_QUANTIZATION``; ``float32+int8`` is a float32 model with
int8 weights, as a CPU without native bf16 serves it), over RealToxicityPrompts dev prompts,
each compared with float32:

* greedy agreement: each prompt decoded greedily for ``--new-tokens`` tokens by the
  server's decoder (app.decoding) in both precisions; the share of prompts whose tokens
  are identical, the mean length of the common prefix, and the share of positions equal;
* next-token distributions: both models read each prompt plus its float32 greedy
  completion (teacher forcing, so the contexts are the same); mean KL(p_fp32 || p_bf16)
  and top-1 agreement over the prompt's last position and every completion position;
* decode speed: tokens/s of decode steps alone (prefill excluded) at each ``--batch``
  size, the variants alternating for ``--repeats`` rounds (median reported), rows sampled
  at temperature 1 with EOS ignored so every step runs the full batch.

Usage: ``python benchmarks/dtype_agreement.py [--prompts 50] [--new-tokens 20]
[--batch 1 16] [--threads 1] [--variants bfloat16 int8 float32+int8] [--json out.json]``.
Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.decoding import DecodeBatch, Row, RowSampling, decode, make_batch  # noqa: E402
from benchmarks.engine_choice import load_prompts  # noqa: E402
from quark.models import QuarkModel, load_model  # noqa: E402
from quark.precision import QUANTIZATION_CHOICES  # noqa: E402
from quark.quantize import quantize_linears  # noqa: E402

#: A variant is "<dtype>", "<method>" (a bfloat16 model with those weights) or "<dtype>+<method>".
DEFAULT_VARIANTS = ("bfloat16", "int8", "int4")


def load_variant(model: str, variant: str) -> QuarkModel:
    """The model as ``variant`` serves it: "<dtype>", "<method>" or "<dtype>+<method>"."""
    dtype, _, method = variant.partition("+")
    if dtype in QUANTIZATION_CHOICES[1:]:  # "int8": a bfloat16 model with int8 weights
        dtype, method = "bfloat16", dtype
    qm = load_model(model, device="cpu", dtype=getattr(torch, dtype))
    if method:
        quantize_linears(qm.model, method)
    return qm


def prompt_ids(qm: QuarkModel, prompts: list[str]) -> list[list[int]]:
    return [list(qm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def greedy(qm: QuarkModel, ids: list[int], new_tokens: int) -> list[int]:
    """The server's greedy decode of one prompt (alone in its batch, as offline)."""
    [row] = decode(qm, [Row(list(ids), RowSampling(new_tokens, temperature=0.0))])
    return row.tokens


def greedy_agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    prefixes, equal, total = [], 0, 0
    for x, y in zip(a, b, strict=True):
        common = next(
            (i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t), min(len(x), len(y))
        )
        prefixes.append(common)
        equal += sum(s == t for s, t in zip(x, y, strict=False))
        total += max(len(x), len(y))
    same = sum(x == y for x, y in zip(a, b, strict=True))
    return {
        "prompts": len(a),
        "identical_share": round(same / len(a), 4),
        "mean_common_prefix_tokens": round(statistics.mean(prefixes), 2),
        "position_equal_share": round(equal / max(1, total), 4),
    }


@torch.inference_mode()
def next_token_log_probs(qm: QuarkModel, ids: list[int], first: int) -> torch.Tensor:
    """Log-probabilities [positions, V] of the next token at positions first-1 .. end-1."""
    logits = qm.model(input_ids=torch.tensor([ids])).logits[0, first - 1 :]
    return torch.log_softmax(logits.float(), dim=-1)


def distribution_agreement(
    fp32: QuarkModel, bf16: QuarkModel, prompts: list[list[int]], completions: list[list[int]]
) -> dict[str, float]:
    """Teacher-forced on the float32 greedy completions: KL(fp32 || other), top-1 agreement."""
    kls: list[float] = []
    top1: list[bool] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = prompt + completion[:-1] if completion else prompt
        p = next_token_log_probs(fp32, ids, len(prompt))
        q = next_token_log_probs(bf16, ids, len(prompt))
        kl = (p.exp() * (p - q)).sum(dim=-1)  # [positions]
        kls.extend(kl.tolist())
        top1.extend((p.argmax(-1) == q.argmax(-1)).tolist())
    return {
        "positions": len(kls),
        "mean_kl_fp32_bf16": float(f"{statistics.mean(kls):.3g}"),
        "p99_kl": float(f"{sorted(kls)[int(0.99 * (len(kls) - 1))]:.3g}"),
        "max_kl": float(f"{max(kls):.3g}"),
        "top1_agreement": round(sum(top1) / len(top1), 4),
    }


def speed_rows(prompts: list[list[int]], batch: int, new_tokens: int) -> list[Row]:
    """``batch`` rows cycling over ``prompts``, sampled at temperature 1, seeds 0.."""
    return [
        Row(list(prompts[i % len(prompts)]), RowSampling(new_tokens, seed=i)) for i in range(batch)
    ]


def speed_decoder(qm: QuarkModel, model: torch.nn.Module | None = None) -> DecodeBatch:
    """The server's decoder for ``qm`` (running ``model`` instead of ``qm.model`` if given)
    with EOS ignored: every row runs every step, a constant batch size."""
    decoder = make_batch(qm)
    if model is not None:
        # A compiled wrapper of qm.model: an nn.Module that answers like the model.
        decoder.model = model  # type: ignore[assignment]
    decoder.eos = set()
    return decoder


def decode_rate(qm: QuarkModel, prompts: list[list[int]], batch: int, steps: int) -> float:
    """Tokens/s of ``steps`` decode steps of ``batch`` rows (prefill not timed)."""
    decoder = speed_decoder(qm)
    decoder.add(speed_rows(prompts, batch, steps + 1))
    start = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    return batch * steps / (time.perf_counter() - start)


def speed(
    models: dict[str, QuarkModel],
    prompts: list[list[int]],
    batches: list[int],
    args: argparse.Namespace,
) -> list[dict[str, float]]:
    """Median decode tokens/s per batch size and variant, the variants alternating per round."""
    table = []
    for batch in batches:
        rates: dict[str, list[float]] = {name: [] for name in models}
        for qm in models.values():  # warm-up: first calls allocate and pick kernels
            decode_rate(qm, prompts, batch, 2)
        for _ in range(args.repeats):
            for name, qm in models.items():
                rates[name].append(decode_rate(qm, prompts, batch, args.new_tokens))
        medians = {name: statistics.median(r) for name, r in rates.items()}
        row = {"batch": batch, **{f"{n} tokens/s": round(v, 2) for n, v in medians.items()}}
        row.update({f"{n} / float32": round(v / medians["float32"], 3) for n, v in medians.items()})
        table.append(row)
        print(json.dumps(row), flush=True)
    return table


def markdown(
    agreement: dict[str, dict[str, dict[str, float]]], rows: list[dict[str, float]]
) -> str:
    lines = []
    for name, stats in agreement.items():
        g, d = stats["greedy"], stats["distribution"]
        lines.append(
            f"{name}: greedy, {g['prompts']} prompts: identical {g['identical_share']:.0%}, "
            f"mean common prefix {g['mean_common_prefix_tokens']} tokens, positions equal "
            f"{g['position_equal_share']:.1%}; next-token KL(float32 || {name}) over "
            f"{d['positions']} positions: mean {d['mean_kl_fp32_bf16']}, p99 {d['p99_kl']}, "
            f"max {d['max_kl']}; top-1 agreement {d['top1_agreement']:.1%}"
        )
    names = (
        [k.removesuffix(" tokens/s") for k in rows[0] if k.endswith(" tokens/s")] if rows else []
    )
    lines += ["", "| batch | " + " | ".join(f"{n} tokens/s (x fp32)" for n in names) + " |",
              "|---:|" + "---:|" * len(names)]  # fmt: skip
    for r in rows:
        cells = [f"{r[f'{n} tokens/s']} ({r[f'{n} / float32']}x)" for n in names]
        lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 16, 32], help="none: no timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one compute core)")
    parser.add_argument(
        "--variants", nargs="+", default=list(DEFAULT_VARIANTS), help="e.g. bfloat16 float32+int8"
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"float32": load_model(args.model, device="cpu", dtype=torch.float32)}
    for variant in args.variants:
        models[variant] = load_variant(args.model, variant)
    prompts = prompt_ids(models["float32"], load_prompts(args.prompts))
    outputs = {n: [greedy(qm, p, args.new_tokens) for p in prompts] for n, qm in models.items()}
    agreement = {
        name: {
            "greedy": greedy_agreement(outputs["float32"], outputs[name]),
            "distribution": distribution_agreement(
                models["float32"], models[name], prompts, outputs["float32"]
            ),
        }
        for name in args.variants
    }
    print(json.dumps(agreement), flush=True)
    rows = speed(models, prompts, args.batch, args)
    print(markdown(agreement, rows))
    if args.json:
        report = {"agreement": agreement, "speed": rows,
                  "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
