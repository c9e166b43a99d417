"""quark-serve against llama-cpp-python's OpenAI server, side by side in one run (issue 11).

Both serve the same GGUF (the default model's, ``quark.models.default_gguf()``, unless
``--gguf``) with one compute thread each, and both get the same RealToxicityPrompts dev
prompts as 20-token ``POST /v1/completions`` (temperature 1, top-p 1). For each client
count, closed-loop clients send requests back to back for ``--seconds``; tokens/s counts
the completion tokens of requests that finished inside that window; latency is per
request. The two servers take turns level by level (the order alternates), each with the
CPU to itself while it is measured; after each level the server is drained with one
small request so the next level starts on an idle server.

llama-cpp-python is not a project dependency: give a Python that has it with
``--peer-python`` (e.g. a venv: ``python3 -m venv /tmp/peer-venv &&
/tmp/peer-venv/bin/pip install 'llama-cpp-python[server]'``).

One of our servers runs per ``--quantization`` value (default: ``none``, ``int8``, ``int4``), all
measured in the same rounds, so the table compares each with llama.cpp and with each other.

Usage: ``python benchmarks/peer_serving.py --peer-python /tmp/peer-venv/bin/python
[--seconds 40] [--levels 1 4 16 32] [--dtype auto] [--quantization none int8 int4]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_choice import load_prompts  # noqa: E402
from benchmarks.serve_throughput import _drop_keys  # noqa: E402
from benchmarks.server import launch_server  # noqa: E402
from quark.service.up import free_port  # noqa: E402

READY_TIMEOUT_S = 300
QUARK = "quark-serve"
PEER = "llama.cpp"


@dataclass
class Target:
    """One server under test: where it answers and what its request bodies carry."""

    name: str
    url: str
    extra: dict[str, object]  # fields only this server needs (its sampler's knobs)


@dataclass
class LevelResult:
    server: str
    clients: int
    seconds: float
    requests: int
    errors: int
    tokens: int
    tokens_per_s: float
    p50_latency_s: float | None
    mean_tokens_per_request: float | None


def body(target: Target, prompt: str, max_tokens: int, seed: int) -> dict[str, object]:
    return {
        "model": "quark",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": seed,
        **target.extra,
    }


async def run_level(
    target: Target, prompts: list[str], clients: int, seconds: float, max_tokens: int
) -> LevelResult:
    """``clients`` closed-loop clients for ``seconds``; requests still running at the end
    are cancelled and not counted."""
    latencies: list[float] = []
    counts = {"tokens": 0, "errors": 0}
    limits = httpx.Limits(max_connections=clients + 2)

    async def client(worker: int, http: httpx.AsyncClient, deadline: float) -> None:
        i = 0
        while time.perf_counter() < deadline:
            prompt = prompts[(worker * 7919 + i) % len(prompts)]
            start = time.perf_counter()
            answer = await http.post(
                "/v1/completions", json=body(target, prompt, max_tokens, worker * 100_000 + i)
            )
            i += 1
            if answer.status_code != 200:
                counts["errors"] += 1
                continue
            if time.perf_counter() <= deadline:
                latencies.append(time.perf_counter() - start)
                counts["tokens"] += int(answer.json()["usage"]["completion_tokens"])

    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits) as http:
        deadline = time.perf_counter() + seconds
        tasks = [asyncio.create_task(client(w, http, deadline)) for w in range(clients)]
        await asyncio.wait(tasks, timeout=seconds)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    tokens, done = counts["tokens"], len(latencies)
    return LevelResult(
        target.name, clients, seconds, done, counts["errors"], tokens, round(tokens / seconds, 2),
        round(statistics.median(latencies), 3) if latencies else None,
        round(tokens / done, 2) if done else None,
    )  # fmt: skip


def drain(target: Target, timeout: float = 600) -> None:
    """One small request: it finishes once what the last level left queued is done."""
    answer = httpx.post(
        f"{target.url}/v1/completions",
        json=body(target, "Hello", 1, 0),
        timeout=timeout,
    )
    answer.raise_for_status()


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {READY_TIMEOUT_S} s")


def start_peer(
    python: str, gguf: Path, threads: int, workdir: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """llama-cpp-python's OpenAI server on a free port."""
    port = free_port()
    command = [
        python, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
        "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", "2048", "--verbose", "False",
    ]  # fmt: skip
    log = workdir / "peer.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
    except BaseException:
        process.terminate()
        raise
    return process, url


def start_quark(
    gguf: Path, threads: int, dtype: str, quantization: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Our server on the same GGUF (converted once into the model cache)."""
    prefix = f"bench-peer-{uuid.uuid4().hex[:8]}"
    process, url = launch_server({
        "QUARK_MODEL": str(gguf), "QUARK_KEY_PREFIX": prefix,
        "QUARK_DATA_DIR": str(workdir / f"data-{quantization}"),
        "QUARK_TORCH_THREADS": str(threads), "QUARK_DTYPE": dtype,
        "QUARK_QUANTIZATION": quantization, "QUARK_WATCH_VERSIONS": "0",
        "QUARK_MAX_QUEUE": "1024",  # every client's request waits: none is turned away
    })  # fmt: skip
    return process, url, prefix


def table(results: list[LevelResult]) -> str:
    """One row per client count: each of our servers against the peer."""
    by = {(r.server, r.clients): r for r in results}
    ours = sorted({r.server for r in results if r.server != PEER})

    def latency(r: LevelResult) -> str:
        return f"{r.p50_latency_s} s" if r.p50_latency_s is not None else "-"

    lines = [
        "| clients | llama-cpp-python server tokens/s (p50) | "
        + " | ".join(f"{name} tokens/s (p50), ratio" for name in ours) + " |",
        "|---:|---:|" + "---:|" * len(ours),
    ]  # fmt: skip
    for clients in sorted({r.clients for r in results}):
        peer = by[(PEER, clients)]
        cells = []
        for name in ours:
            a = by[(name, clients)]
            ratio = f"{a.tokens_per_s / peer.tokens_per_s:.2f}x" if peer.tokens_per_s else "-"
            cells.append(f"{a.tokens_per_s} ({latency(a)}), {ratio}")
        lines.append(
            f"| {clients} | {peer.tokens_per_s} ({latency(peer)}) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def measure(targets: list[Target], args: argparse.Namespace) -> list[LevelResult]:
    prompts = load_prompts(args.prompts)
    for target in targets:  # warm-up: first requests allocate and pick kernels
        asyncio.run(run_level(target, prompts, 2, min(5.0, args.seconds), args.max_tokens))
        drain(target)
    results: list[LevelResult] = []
    for n, clients in enumerate(args.levels):
        for target in targets if n % 2 == 0 else targets[::-1]:
            result = asyncio.run(run_level(target, prompts, clients, args.seconds, args.max_tokens))
            drain(target)
            print(json.dumps(asdict(result)), flush=True)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peer-python", required=True, help="a Python with llama-cpp-python")
    parser.add_argument("--gguf", type=Path, help="model file (default: the default model's)")
    parser.add_argument("--seconds", type=float, default=40, help="per level and server")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="compute threads of each server")
    parser.add_argument("--dtype", default="auto", help="QUARK_DTYPE of our servers")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8", "int4"],
                        help="one of our servers per QUARK_QUANTIZATION value")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=200, help="RTP dev prompts to cycle")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    from quark.models import default_gguf

    gguf = (args.gguf or default_gguf()).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="quark-peer-"))
    stops: list[Callable[[], None]] = []
    try:
        targets = []
        for quantization in args.quantization:
            ours, url, prefix = start_quark(gguf, args.threads, args.dtype, quantization, workdir)
            stops.append(functools.partial(_stop, ours, prefix))
            targets.append(Target(f"{QUARK} ({quantization})", url, {}))
        peer, peer_url = start_peer(args.peer_python, gguf, args.threads, workdir)
        stops.append(lambda: _stop(peer))
        # llama.cpp's own sampler defaults (top-k 40, min-p 0.05, ...) off: plain sampling.
        plain: dict[str, object] = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
        targets.append(Target(PEER, peer_url, plain))
        results = measure(targets, args)
    finally:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{gguf.name}, {args.seconds:g} s per level, {args.threads} thread(s) each, "
          f"{args.max_tokens}-token completions, QUARK_DTYPE={args.dtype}, "
          f"QUARK_QUANTIZATION={' / '.join(args.quantization)}\n")  # fmt: skip
    print(table(results))
    if args.json:
        report = {"results": [asdict(r) for r in results], "table": table(results),
                  "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))


def _stop(process: subprocess.Popen[bytes], redis_prefix: str | None = None) -> None:
    """Stop a server; for ours, also drop the benchmark's pool records from Redis."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _drop_keys(redis_prefix)


if __name__ == "__main__":
    main()
