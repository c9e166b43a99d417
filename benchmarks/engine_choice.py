"""Which batched decoder should the server use on this machine?

Measures, on the same prompts and the same model, generated tokens/s of:

* ``sequential``: one ``model.generate`` call per prompt (the baseline of serve_throughput);
* ``hf_generate``: transformers' padded batched ``generate`` over all prompts at once;
* ``hf_generate_batch``: transformers' continuous-batching ``generate_batch`` API;
* ``quark_decode``: app.decoding.DecodeBatch (our KV-cached step loop with per-row
  sampling parameters, seeds, cancellation and rows joining between steps).

Usage: ``python benchmarks/engine_choice.py --batch 16 --new-tokens 20``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from transformers import GenerationConfig

from app.decoding import Row, RowSampling, make_batch
from quark.models import load_model
from quark.sampling import eos_ids

FALLBACK_PROMPTS = [
    "The weather today is",
    "My favourite book is about",
    "In the middle of the night, the old house",
    "Scientists have discovered that",
    "The best way to learn a language is",
    "When I was a child, I used to",
    "The city council voted to",
    "Here is a short story about a dragon:",
]


def load_prompts(count: int) -> list[str]:
    """Prompts from the shared RealToxicityPrompts dev split when present, else built-ins."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp" / "dev.jsonl"
    texts: list[str] = []
    if path.exists():
        with path.open() as handle:
            for line in handle:
                texts.append(json.loads(line)["prompt"]["text"])
                if len(texts) >= count:
                    break
    while len(texts) < count:
        texts.append(FALLBACK_PROMPTS[len(texts) % len(FALLBACK_PROMPTS)])
    return texts[:count]


def timed(fn: Callable[[], int]) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--skip", nargs="*", default=[], help="methods to skip")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    qm = load_model(args.model, device="cpu")
    tok, model = qm.tokenizer, cast(Any, qm.model)  # a transformers model: .generate()
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in load_prompts(args.batch)]
    n, stops = args.new_tokens, eos_ids(qm)
    common: dict[str, Any] = {"do_sample": True, "top_k": None, "top_p": 1.0, "temperature": 1.0}
    common |= {"pad_token_id": tok.pad_token_id, "eos_token_id": stops}

    @torch.inference_mode()
    def sequential() -> int:
        total = 0
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, **common)
            total += out.shape[1] - x.shape[1]
        return total

    @torch.inference_mode()
    def hf_generate() -> int:
        batch = tok.pad([{"input_ids": ids} for ids in prompts], return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=n, **common)
        new = out[:, batch["input_ids"].shape[1] :]
        return int((~torch.isin(new, torch.tensor(stops))).sum())

    def hf_generate_batch() -> int:
        config = GenerationConfig(max_new_tokens=n, **common)
        results = model.generate_batch(prompts, generation_config=config, warmup=False)
        return sum(len(r.generated_tokens) for r in results.values())

    def quark_decode() -> int:
        batch = make_batch(qm)
        rows = [Row(list(ids), RowSampling(n, 1.0, 1.0, seed=i)) for i, ids in enumerate(prompts)]
        batch.add(rows)
        while len(batch):
            batch.step()
        return sum(len(r.tokens) for r in rows)

    methods = {
        "sequential": sequential,
        "hf_generate": hf_generate,
        "hf_generate_batch": hf_generate_batch,
        "quark_decode": quark_decode,
    }
    # Methods take turns and report medians: on a shared CPU the load drifts, and
    # interleaving makes every method see the same mix of quiet and busy moments.
    # Tokens per CPU-second (this process's threads) is less sensitive to other processes.
    runs: dict[str, list[tuple[float, float]]] = {}
    failed: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            if name in args.skip or name in failed:
                continue
            try:
                runs.setdefault(name, []).append(timed(fn))
            except Exception as exc:  # a failing API is a result too
                failed[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            print(name, failed.get(name) or runs[name][-1], flush=True)
    results: dict[str, object] = dict(failed)
    for name, values in runs.items():
        results[name] = {
            "tokens_per_s": round(statistics.median(v[0] for v in values), 1),
            "tokens_per_cpu_s": round(statistics.median(v[1] for v in values), 1),
            "runs": len(values),
        }
    summary = {"batch": args.batch, "new_tokens": n, "threads": torch.get_num_threads()}
    print(json.dumps({**summary, "results": results}))


if __name__ == "__main__":
    main()
