"""Hot swap under load: concurrent streaming clients while new model versions are published.

Starts a server (tiny model by default, ``--model default`` for SmolLM2-135M) on the
configured Redis under a fresh key prefix, or uses ``--url`` with ``--prefix`` and
``--data-dir`` of a running one. Before the clock starts it writes ``--swaps`` versions into
the model store (the active version with a little noise on its embeddings, so each is a
distinct model); during the run it activates one every ``duration / (swaps + 1)`` seconds,
exactly what a worker does when a job passes its gate. Reports:

* failed requests (HTTP errors, error events; target 0);
* the longest pause in served tokens (largest gap between consecutive streamed deltas over
  all clients), during swap windows and in steady state;
* p50/p99 request latency during swap windows (activation -> 2 s after the first response
  from the new version) vs. steady state;
* time from activation to the first response finished by the new version.

Usage: ``python benchmarks/hot_swap.py [--duration 60] [--clients 8] [--model default]
[--quantization int8]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.server import launch_server  # noqa: E402

PROMPTS = [
    "The weather today is", "My favourite book is about", "In the city at night,",
    "The best way to learn is", "Yesterday I met a", "The river flows past",
]  # fmt: skip


@dataclass
class Run:
    started: float = field(default_factory=time.time)
    tokens: list[float] = field(default_factory=list)  # arrival time of every streamed delta
    requests: list[tuple[float, float, str | None]] = field(default_factory=list)  # t0, t1, ver
    failures: list[str] = field(default_factory=list)
    activations: list[tuple[float, str]] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream_one(http: httpx.AsyncClient, run: Run, prompt: str, tokens: int) -> None:
    body = {"prompt": prompt, "max_new_tokens": tokens, "stream": True, "log": False}
    started, version = time.time(), None
    try:
        async with http.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                run.failures.append(f"HTTP {response.status_code}: {await response.aread()!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event["type"] == "delta":
                    run.tokens.append(time.time())
                elif event["type"] == "done":
                    version = event["response"]["model_version"]
                else:
                    run.failures.append(f"error event: {event}")
                    return
    except httpx.HTTPError as exc:
        run.failures.append(f"{type(exc).__name__}: {exc}")
        return
    run.requests.append((started, time.time(), version))


async def client(url: str, run: Run, worker: int, stop: float, tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        i = 0
        while time.time() < stop:
            await stream_one(http, run, PROMPTS[(worker + i) % len(PROMPTS)], tokens)
            i += 1


def stage_versions(store: Any, count: int) -> list[str]:
    """Write ``count`` new versions (not active yet): the active one plus embedding noise."""
    import torch

    base = store.active()
    qm = store.load(base, device="cpu")
    versions = []
    for k in range(count):
        with torch.no_grad():
            weight = qm.model.get_input_embeddings().weight
            weight.add_(torch.randn_like(weight) * 1e-3)
        versions.append(store.publish(qm, {"parent": base, "kind": "benchmark", "step": k}))
    return versions


async def activate_on_schedule(store: Any, versions: list[str], run: Run, duration: float) -> None:
    interval = duration / (len(versions) + 1)
    for k, version in enumerate(versions):
        await asyncio.sleep(max(0.0, run.started + interval * (k + 1) - time.time()))
        await asyncio.to_thread(store.activate, version)
        run.activations.append((time.time(), version))


def analyse(run: Run, end: float) -> dict[str, Any]:
    """Swap windows, latencies, token pauses, publish-to-serve times."""
    windows, to_first = [], []
    for at, version in run.activations:
        firsts = [t1 for _, t1, v in run.requests if v == version and t1 >= at]
        first = min(firsts) if firsts else None
        to_first.append(None if first is None else round(first - at, 3))
        windows.append((at, (first or at) + 2.0))

    def in_swap(t0: float, t1: float) -> bool:
        return any(t0 < w1 and t1 > w0 for w0, w1 in windows)

    swap_lat = [t1 - t0 for t0, t1, _ in run.requests if in_swap(t0, t1)]
    steady_lat = [t1 - t0 for t0, t1, _ in run.requests if not in_swap(t0, t1)]
    ticks = sorted(run.tokens)
    gaps = [(b - a, a) for a, b in itertools.pairwise(ticks)]
    swap_gaps = [g for g, a in gaps if in_swap(a, a + g)]
    steady_gaps = [g for g, a in gaps if not in_swap(a, a + g)]
    return {
        "requests": len(run.requests),
        "failed_requests": len(run.failures),
        "failures": run.failures[:10],
        "streamed_deltas": len(ticks),
        "seconds": round(end - run.started, 1),
        "versions_published": [v for _, v in run.activations],
        "publish_to_first_response_s": to_first,
        "longest_token_pause_s": round(max((g for g, _ in gaps), default=0.0), 3),
        "longest_token_pause_in_swaps_s": round(max(swap_gaps, default=0.0), 3),
        "longest_token_pause_steady_s": round(max(steady_gaps, default=0.0), 3),
        "latency_swap_p50_s": _r(percentile(swap_lat, 0.5)),
        "latency_swap_p99_s": _r(percentile(swap_lat, 0.99)),
        "latency_steady_p50_s": _r(percentile(steady_lat, 0.5)),
        "latency_steady_p99_s": _r(percentile(steady_lat, 0.99)),
        "requests_in_swap_windows": len(swap_lat),
        "versions_seen": sorted({v for _, _, v in run.requests if v}),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def measure(url: str, store: Any, args: argparse.Namespace) -> dict[str, Any]:
    versions = await asyncio.to_thread(stage_versions, store, args.swaps)
    await stream_one(httpx.AsyncClient(base_url=url, timeout=120), Run(), PROMPTS[0], 4)  # warm
    run = Run()
    stop = run.started + args.duration
    clients = [client(url, run, w, stop, args.max_new_tokens) for w in range(args.clients)]
    await asyncio.gather(activate_on_schedule(store, versions, run, args.duration), *clients)
    return analyse(run, time.time())


def start_server(
    model: str, data_dir: Path, prefix: str, quantization: str
) -> tuple[subprocess.Popen[bytes], str]:
    return launch_server({
        "QUARK_MODEL": model, "QUARK_KEY_PREFIX": prefix, "QUARK_DATA_DIR": str(data_dir),
        "QUARK_REDIS_URL": os.environ.get("QUARK_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "QUARK_WATCHER_POLL_S": "2", "QUARK_DEVICE": "cpu", "QUARK_QUANTIZATION": quantization,
    })  # fmt: skip


def wait_serving_v0(url: str, store: Any, timeout: float = 300) -> None:
    """The server swaps to version 0 once it has published it (its start-up bootstrap)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = store.active()
        if active:
            body = httpx.post(
                f"{url}/generate",
                json={"prompt": "Hi", "max_new_tokens": 1, "log": False},
                timeout=60,
            ).json()
            if body.get("model_version") == active:
                return
        time.sleep(0.5)
    raise RuntimeError("the server never served the store's active version")


def markdown(result: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        ("clients x duration", f"{args.clients} x {args.duration:.0f} s"),
        ("versions published", len(result["versions_published"])),
        ("requests (failed)", f"{result['requests']} ({result['failed_requests']})"),
        ("publish -> first response on the new version (s)",
         ", ".join(str(x) for x in result["publish_to_first_response_s"])),
        ("longest pause in served tokens, swap windows (s)",
         result["longest_token_pause_in_swaps_s"]),
        ("longest pause in served tokens, steady state (s)",
         result["longest_token_pause_steady_s"]),
        ("latency p50 / p99, swap windows (s)",
         f"{result['latency_swap_p50_s']} / {result['latency_swap_p99_s']}"),
        ("latency p50 / p99, steady state (s)",
         f"{result['latency_steady_p50_s']} / {result['latency_steady_p99_s']}"),
    ]  # fmt: skip
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running server (then give --prefix and --data-dir)")
    parser.add_argument("--prefix", help="its QUARK_KEY_PREFIX")
    parser.add_argument("--data-dir", type=Path, help="its QUARK_DATA_DIR (the model store)")
    parser.add_argument("--model", default="tiny", help="'tiny' (default) or a model source")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--quantization", default="none", help="QUARK_QUANTIZATION of the server")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "hot_swap.json")
    args = parser.parse_args()

    import redis

    from quark.service.store import ModelStore, RedisVersionPointer

    workdir = Path(tempfile.mkdtemp(prefix="quark-hot-swap-"))
    prefix = args.prefix or f"bench-swap-{uuid.uuid4().hex[:8]}"
    data_dir = args.data_dir or workdir / "data"
    redis_url = os.environ.get("QUARK_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(redis_url)
    store = ModelStore(data_dir / "models", RedisVersionPointer(client, prefix))
    process = None
    try:
        url = args.url
        if url is None:
            model = args.model
            if model == "tiny":
                from testkit.tiny_model import save_tiny_model

                model = str(save_tiny_model(workdir / "tiny", workdir / "tokenizer"))
            process, url = start_server(model, data_dir, prefix, args.quantization)
        wait_serving_v0(url, store)
        result = asyncio.run(measure(url, store, args))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
        if args.prefix is None:
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
    result.update(model=args.model, clients=args.clients, duration_s=args.duration,
                  max_new_tokens=args.max_new_tokens, quantization=args.quantization)  # fmt: skip
    result["table"] = markdown(result, args)
    print(json.dumps({k: v for k, v in result.items() if k != "table"}, indent=2))
    print(result["table"])
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
