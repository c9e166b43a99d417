"""Does ``torch.compile`` of the decode step pay on this CPU? (issue 11)

Loads the default model (or ``--model``) in ``--dtype`` and decodes the same rows with the
server's decoder (``app.decoding.make_batch``, as ``benchmarks/dtype_agreement.py`` times
it) twice: with the model as loaded (eager) and with ``torch.compile(model, dynamic=True)``
(inductor, default mode). For each batch size it reports the eager and compiled decode
speed (tokens/s of the decode steps alone, median of ``--repeats`` rounds of ``--steps``
steps, rows sampled at temperature 1 with EOS never stopping a row), the wall time of the
compiled model's first prefill and first decode step (compilation: what the first request
would wait if the server compiled on the request path), and how many times dynamo compiled
(a recompile per new shape would show here).

Usage: ``python benchmarks/compile_probe.py [--batch 1 4] [--steps 20] [--threads 1]
[--json out.json]``. One thread; timings on a shared machine are noisy: compare the two
columns of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.dtype_agreement import prompt_ids, speed_decoder, speed_rows  # noqa: E402
from benchmarks.engine_choice import load_prompts  # noqa: E402
from quark.models import QuarkModel, load_model  # noqa: E402
from quark.precision import resolve_dtype  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=20, help="decode steps per round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    return p.parse_args()


def decode_round(
    qm: QuarkModel, model: torch.nn.Module, ids: list[list[int]], rows: int, steps: int
) -> dict[str, float]:
    """Prefill ``rows`` rows and time ``steps`` decode steps of ``model`` (``qm.model`` or its
    compiled wrapper): prefill, first step and steady tokens/s."""
    batch = speed_decoder(qm, model)
    started = time.perf_counter()
    batch.add(speed_rows(ids, rows, steps + 2))  # no row finishes inside the round
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    batch.step()
    first_step = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps - 1):
        batch.step()
    steady = time.perf_counter() - started
    return {
        "prefill_s": prefill,
        "first_step_s": first_step,
        "tokens_per_s": rows * (steps - 1) / steady,
    }


def compile_count() -> int:
    counters: Any = torch._dynamo.utils.counters  # dynamo's own statistics
    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    qm = load_model(args.model, dtype=resolve_dtype(args.dtype))
    ids = prompt_ids(qm, load_prompts(max(args.batch)))
    eager = qm.model
    # Compiling a module returns an OptimizedModule (an nn.Module), typed as a callable.
    compiled = cast(torch.nn.Module, torch.compile(qm.model, dynamic=True))
    results: dict[str, Any] = {"dtype": str(next(eager.parameters()).dtype), "batches": {}}
    for batch in args.batch:
        row: dict[str, Any] = {}
        graphs_before = compile_count()
        row["compiled_cold"] = decode_round(qm, compiled, ids, batch, args.steps)
        for name, model in (("eager", eager), ("compiled", compiled)):
            rounds = [decode_round(qm, model, ids, batch, args.steps) for _ in range(args.repeats)]
            row[name] = statistics.median(r["tokens_per_s"] for r in rounds)
            row[f"{name}_prefill_s"] = statistics.median(r["prefill_s"] for r in rounds)
        row["graphs_compiled"] = compile_count() - graphs_before
        row["speedup"] = row["compiled"] / row["eager"]
        results["batches"][str(batch)] = row
        print(batch, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
