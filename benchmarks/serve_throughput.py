"""Serving throughput: N concurrent clients against the server vs sequential ``generate``.

Starts a server with the real default model (or uses ``--url``), then for each
concurrency level runs that many closed-loop clients, each sending ``--rounds`` requests
for ``--max-new-tokens``-token completions to ``POST /generate``. Reports requests/s,
generated tokens/s and p50/p99 latency per level and, measured in the same run on the
same prompts, the tokens/s of plain sequential one-request-at-a-time ``model.generate``.

Usage: ``python benchmarks/serve_throughput.py [--url http://host:port] [--levels 1 4 16 32]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_choice import load_prompts  # noqa: E402
from benchmarks.server import launch_server  # noqa: E402


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    tokens_per_s: float
    p50_latency_s: float
    p99_latency_s: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_level(
    url: str, prompts: list[str], concurrency: int, rounds: int, new_tokens: int, key: str
) -> LevelResult:
    """``concurrency`` clients, each sending ``rounds`` requests back to back."""
    latencies: list[float] = []
    tokens = errors = 0
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        for i in range(rounds):
            prompt = prompts[(worker * rounds + i) % len(prompts)]
            body = {"prompt": prompt, "max_new_tokens": new_tokens, "seed": worker * 1000 + i}
            start = time.perf_counter()
            response = await http.post("/generate", json=body)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors += 1
                continue
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        seconds = time.perf_counter() - start
    count = concurrency * rounds
    return LevelResult(
        concurrency,
        count,
        errors,
        round(seconds, 2),
        round(count / seconds, 3),
        round(tokens / seconds, 2),
        round(statistics.median(latencies), 3),
        round(percentile(latencies, 0.99), 3),
    )


def sequential_tokens_per_s(
    model: str, prompts: list[str], new_tokens: int, threads: int
) -> dict[str, float]:
    """Plain ``model.generate``, one prompt at a time, same sampling as the server."""
    import torch

    from quark.models import load_model
    from quark.sampling import eos_ids

    torch.set_num_threads(threads)
    qm = load_model(model, device="cpu")
    stops = eos_ids(qm)
    kwargs: dict[str, Any] = {"do_sample": True, "top_k": None, "top_p": 1.0, "temperature": 1.0}
    kwargs |= {"pad_token_id": qm.tokenizer.pad_token_id, "eos_token_id": stops}
    total, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            torch.manual_seed(i)
            ids = torch.tensor([qm.tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            out = cast(Any, qm.model).generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, **kwargs
            )
            new = out[0, ids.shape[1] :].tolist()
            total += len([t for t in new if t not in stops])
    seconds = time.perf_counter() - start
    return {"requests": len(prompts), "seconds": round(seconds, 2),
            "tokens_per_s": round(total / seconds, 2),
            "requests_per_s": round(len(prompts) / seconds, 3)}  # fmt: skip


def start_server(
    model: str, threads: int, data_dir: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    """A server subprocess on a free port; returns (process, url, redis key prefix)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    process, url = launch_server({
        "QUARK_MODEL": model, "QUARK_KEY_PREFIX": prefix, "QUARK_DATA_DIR": data_dir,
        "QUARK_TORCH_THREADS": str(threads),
        "QUARK_WATCH_VERSIONS": "0",  # serve exactly --model; no store bootstrap
    })  # fmt: skip
    return process, url, prefix


def _drop_keys(prefix: str | None) -> None:
    """Remove the benchmark's pool records from Redis (they are not real traffic)."""
    if not prefix:
        return
    try:
        import redis

        from quark.service.settings import ServiceSettings

        client = redis.Redis.from_url(ServiceSettings().redis_url, socket_connect_timeout=2)
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    except Exception as exc:  # Redis down: the records sit in the local spool instead
        print(f"could not clean up Redis keys {prefix}:*: {exc}", file=sys.stderr)


def markdown(levels: list[LevelResult], sequential: dict[str, float]) -> str:
    base = sequential["tokens_per_s"]
    lines = [
        "| clients | requests | req/s | tokens/s | p50 latency (s) | p99 latency (s) "
        "| x sequential tokens/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| sequential `generate` | {sequential['requests']} | {sequential['requests_per_s']} "
        f"| {base} | | | 1.0 |",
    ]
    for r in levels:
        lines.append(
            f"| {r.concurrency} | {r.requests} | {r.requests_per_s} | {r.tokens_per_s} "
            f"| {r.p50_latency_s} | {r.p99_latency_s} | {r.tokens_per_s / base:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default="default", help="model for server and baseline")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--min-requests", type=int, default=8, help="per level, at least")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--sequential", type=int, default=16, help="prompts for the baseline")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of server and baseline alike (0 = the server's default, cores - 1)",
    )
    parser.add_argument("--api-key", default=os.environ.get("QUARK_BENCH_API_KEY", ""))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve_throughput.json")
    args = parser.parse_args()
    # Server and baseline always use the same thread count: a fair comparison.
    args.threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    prompts = load_prompts(max(64, args.sequential))
    data_dir = tempfile.mkdtemp(prefix="quark-bench-")  # the server's spool: never a shared dir
    process, url, prefix = (
        (None, args.url, None) if args.url else start_server(args.model, args.threads, data_dir)
    )
    assert url is not None
    try:
        asyncio.run(run_level(url, prompts, 2, 1, args.max_new_tokens, args.api_key))  # warm-up
        levels = []
        for level in args.levels:
            rounds = max(args.rounds, -(-args.min_requests // level))
            result = asyncio.run(
                run_level(url, prompts, level, rounds, args.max_new_tokens, args.api_key)
            )
            print(json.dumps(asdict(result)), flush=True)
            levels.append(result)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
            _drop_keys(prefix)
        shutil.rmtree(data_dir, ignore_errors=True)
    # The baseline runs after the server is gone: both get the whole CPU to themselves.
    sequential = sequential_tokens_per_s(
        args.model, prompts[: args.sequential], args.max_new_tokens, args.threads
    )
    print(json.dumps({"sequential": sequential}), flush=True)
    table = markdown(levels, sequential)
    print(table)
    report = {"levels": [asdict(r) for r in levels], "sequential": sequential,
              "max_new_tokens": args.max_new_tokens, "model": args.model, "url": url,
              "threads": args.threads,
              "redis_prefix": prefix, "table": table}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
